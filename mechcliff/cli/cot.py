"""Commands for "CoT is Not the Chain of Truth" (arXiv 2602.04856): ``safety-layers`` and ``spectral``.

Each command generates rollouts for the safe (default: built-in harmless) and unsafe (built-in harmful) prompts with
thinking on or off, writes the saved result (JSON + safetensors, re-plottable with ``mechcliff plot DIR``) and a
self-contained HTML figure to ``--out DIR``, and prints where. The logic lives in :mod:`mechcliff.safety_layers`
and :mod:`mechcliff.spectral`; :func:`parse_layers` and :func:`parse_size` read the ``spectral`` flags.
"""

from __future__ import annotations

import argparse
from typing import Any

from mechcliff.cli.common import Handler, add_model_flag
from mechcliff.errors import MechcliffError


def _common(p: argparse.ArgumentParser) -> None:
    add_model_flag(p)
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
    p.add_argument("--max-think-tokens", type=int, default=None,
                   help="thinking budget per rollout, in tokens (default: 4096 on real models, 64 on the organisms)")
    p.add_argument("--seed", type=int, default=0, help="seed for generation (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_parsers(sub: Any) -> None:
    """Add ``safety-layers`` and ``spectral`` to ``sub`` (the ``add_subparsers`` object of the ``mechcliff`` parser)."""
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


# --------------------------------------------------------------------------- flags


def parse_layers(spec: str | None, n_layers: int) -> list[int] | str | None:
    """``--layers``: ``all`` (default), ``safety`` (the best GAP window), or comma-separated indices / ranges."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    if spec.strip().lower() == "safety":
        return "safety"
    out: list[int] = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, part)
                out += list(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise MechcliffError(f"--layers: cannot read {part!r}; use e.g. '3,4,5', '3-5', 'all' or 'safety'"
                                 ) from None
    for l in out:
        if not -n_layers <= l < n_layers:
            raise MechcliffError(f"--layers: layer {l} is out of range (the model has {n_layers} layers: "
                                 f"0..{n_layers - 1})")
    return [l % n_layers for l in out]


def parse_size(spec: Any) -> int | None:
    """``--size``: an int >= 2, or ``none`` (no resampling)."""
    if spec is None or str(spec).strip().lower() in ("none", "raw", "0"):
        return None
    try:
        size = int(str(spec).strip())
    except ValueError:
        raise MechcliffError(f"--size must be a whole number (e.g. 96) or 'none', got {spec!r}") from None
    if size < 2:
        raise MechcliffError(f"--size must be at least 2 (or 'none'), got {size}")
    return size


# --------------------------------------------------------------------------- commands


def _think_budget(handle: Any, args: argparse.Namespace) -> int:
    """The thinking budget the rollouts ran with (``--max-think-tokens``, else the model's default)."""
    from mechcliff.model.presets import COT_BUDGETS, generation_budgets

    return generation_budgets(handle, args.max_think_tokens, None, short=COT_BUDGETS)[0]


def cmd_safety_layers(args: argparse.Namespace) -> int:
    """``mechcliff safety-layers``: generate rollouts for safe vs unsafe prompts, localise, save, print where."""
    from mechcliff.model.loading import load_model
    from mechcliff.safety_layers import _check_window, load_groups, prepare_groups, safety_layers, write_result

    safe_p, unsafe_p = load_groups(args.safe, args.unsafe, args.n_per_group)
    handle = load_model(args.model)
    thinking = args.thinking == "on"
    _check_window(args.window, handle.n_layers - (1 if args.drop_last else 0))
    safe, unsafe, _ = prepare_groups(handle, safe_p, unsafe_p, thinking=thinking,
                                     max_think_tokens=args.max_think_tokens, seed=args.seed,
                                     progress=not args.no_progress)
    res = safety_layers(handle, safe, unsafe, window=args.window, position=args.position, seed=args.seed,
                        drop_last=args.drop_last,
                        meta={"thinking": args.thinking, "max_think_tokens": _think_budget(handle, args)})
    path, html = write_result(res, args.out, "safety_layers")
    sl = res.safety_layers
    print(f"{handle.model_id}, thinking {args.thinking}: {res.n_safe} safe vs {res.n_unsafe} unsafe texts")
    print(f"safety layers (best {res.window}-layer window by GAP): {sl[0]}-{sl[-1]}, mean GAP {res.score:.4f}")
    print(f"result: {path}")
    print(f"figure: {html.resolve()}")
    return 0


def cmd_spectral(args: argparse.Namespace) -> int:
    """``mechcliff spectral``: rollouts for safe vs unsafe prompts, B1–B3 for every head of the chosen layers, key
    heads, saved result + HTML page (the gap heatmaps of B1, B2 and B3)."""
    from mechcliff.model.loading import load_model
    from mechcliff.safety_layers import load_groups, prepare_groups, safety_layers, write_result
    from mechcliff.spectral import METRICS, _ranges, spectral_head_metrics, write_spectral

    size = parse_size(args.size)
    safe_p, unsafe_p = load_groups(args.safe, args.unsafe, args.n_per_group)
    handle = load_model(args.model)
    layers = parse_layers(args.layers, handle.n_layers)
    thinking = args.thinking == "on"
    safe, unsafe, _ = prepare_groups(handle, safe_p, unsafe_p, thinking=thinking,
                                     max_think_tokens=args.max_think_tokens, seed=args.seed,
                                     progress=not args.no_progress)
    meta = {"thinking": args.thinking, "max_think_tokens": _think_budget(handle, args)}
    if size is not None:
        lengths = [int(b.require(args.position, "the requested position")[i]) - b.pad_lengths[i] + 1 for b in (safe, unsafe)
                   for i in range(len(b))]
        short = sum(t < size for t in lengths)
        if short:
            print(f"note: {short} of {len(lengths)} texts are shorter than {size} tokens "
                  f"({min(lengths)}-{max(lengths)}) and are upsampled, which smears their first attention rows; --size none reads each text's own "
                  "pattern")
    if isinstance(layers, str):  # "safety": the best GAP window, computed first
        sl = safety_layers(handle, safe, unsafe, window=args.window, position=args.position, seed=args.seed, meta=meta)
        path, html = write_result(sl, args.out, "safety_layers")
        layers = sl.safety_layers
        print(f"safety layers (best {sl.window}-layer window by GAP): {layers[0]}-{layers[-1]}; saved to {path}")
    res = spectral_head_metrics(handle, safe, unsafe, layers=layers, position=args.position, size=size,
                                lambda_method=args.lambda_method, seed=args.seed, meta=meta)
    path, html = write_spectral(res, args.out, "spectral")  # B1, B2 and B3, one heatmap each
    print(f"{handle.model_id}, thinking {args.thinking}: {int(res.is_safe.sum())} safe vs "
          f"{int((1 - res.is_safe).sum())} unsafe texts, layers {_ranges(res.layers)}")
    for m in METRICS:
        print(f"key heads by {m.upper()}: {', '.join(res.key_head_labels(m)) or 'none'}")
    print(f"key heads (B1-B3 union): {', '.join(res.key_head_labels()) or 'none'}")
    gt = handle.ground_truth
    if gt is not None:  # the organism: show the planted circuit next to what the metric found
        print(f"planted suppression heads (organism): {', '.join(gt.planted_labels)}; harm detectors: "
              f"{', '.join(f'L{l}H{h}' for l, h in gt.harm_detector_heads)}")
    print(f"result: {path}")
    print(f"figure: {html.resolve()}")
    return 0


COMMANDS: dict[str, Handler] = {"safety-layers": cmd_safety_layers, "spectral": cmd_spectral}
