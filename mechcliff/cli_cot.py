"""Commands for "CoT is Not the Chain of Truth" (arXiv 2602.04856): ``safety-layers`` and ``spectral``.

:func:`add_parsers` adds them to the ``mechcliff`` parser and :data:`COMMANDS` maps each name to its function
(:mod:`mechcliff.cli` dispatches to it). Only argument parsing lives here; the logic is in
:func:`mechcliff.safety_layers.run_command` and :func:`mechcliff.spectral.run_command`. Each command generates
rollouts for the safe (default: built-in harmless) and unsafe (built-in harmful) prompts with thinking on or off,
writes the saved result (JSON + safetensors, re-plottable with ``mechcliff plot DIR``) and a self-contained HTML
figure to ``--out DIR``, and prints where.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="organism",
                   help="'organism' (default), 'smollm2-135m-instruct', a local HF folder, a .gguf file or a hub id")
    p.add_argument("--out", required=True, help="folder to write the result and its HTML figure to (created if missing)")
    p.add_argument("--thinking", choices=("on", "off"), default="on",
                   help="generate with thinking on (read prompt + thinking) or off (enable_thinking=False where the chat "
                   "template knows it; the text read is the prompt)")
    p.add_argument("--harmless", "--safe", dest="safe", default=None,
                   help="harmless (safe) prompt file (JSON / JSONL / CSV / TXT; default: built-in harmless)")
    p.add_argument("--harmful", "--unsafe", dest="unsafe", default=None,
                   help="harmful (unsafe) prompt file (default: built-in harmful); give both or neither")
    p.add_argument("--n-per-group", type=int, default=None, help="use at most N prompts per group")
    p.add_argument("--position", default="think_end",
                   help="token whose hidden state / up to which attention is read: think_end (default: last token "
                   "before the answer), last, prompt_end, think_close")
    p.add_argument("--max-think-tokens", type=int, default=64, help="thinking budget per rollout, in tokens (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed for generation (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_parsers(sub: Any) -> None:
    sl = sub.add_parser(
        "safety-layers", help="per-layer cosine GAP between safe and unsafe texts, best window of layers (arXiv 2602.04856)",
        description="Per layer: mean cosine similarity of the last-token hidden states within safe, within unsafe and "
        "across the groups (all pairs, self-pairs excluded); GAP = safe-safe - safe-unsafe; the window of --window "
        "consecutive layers with the largest mean GAP. Writes DIR/safety_layers/ and DIR/safety_layers.html.")
    _common(sl)
    sl.add_argument("--window", type=int, default=3, help="consecutive layers in the window (default 3)")
    sl.add_argument("--drop-last", action="store_true", help="leave out the last layer (the authors do for Qwen)")
    sp = sub.add_parser(
        "spectral", help="per-head softmax-Jacobian metrics B1/B2/B3, safe-unsafe gaps and key heads (arXiv 2602.04856)",
        description="For every head of the chosen layers and every text: the attention pattern resampled to 96x96, "
        "24 rows, J = diag(p) - p p^T; B1 = top eigenvalue, B2 = its eigenvector (centroid), B3 = entropy effective "
        "rank, at the row with the largest B1. Safe - unsafe gaps, key heads by |g'| >= 0.7 max|g'|. Writes "
        "DIR/spectral/ and DIR/spectral.html (and DIR/safety_layers/ with --layers safety).")
    _common(sp)
    sp.add_argument("--layers", default="all",
                    help="'all' (default), 'safety' (the best GAP window, computed first), or indices: '3,4,5' / '3-5'")
    sp.add_argument("--window", type=int, default=3, help="window for --layers safety (default 3)")
    sp.add_argument("--lambda-method", choices=("exact", "power"), default="exact",
                    help="exact top eigenpair (default) or the paper's 20-step power iteration")
    sp.add_argument("--size", default="96",
                    help="resample each attention pattern to SIZE x SIZE (default 96, the paper's), or 'none' to use "
                    "each text's own T x T pattern (bilinear upsampling smears the first rows of texts shorter than SIZE)")


def _safety_layers(args: argparse.Namespace) -> int:
    from mechcliff.safety_layers import run_command

    return run_command(args)


def _spectral(args: argparse.Namespace) -> int:
    from mechcliff.spectral import run_command

    return run_command(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"safety-layers": _safety_layers, "spectral": _spectral}
