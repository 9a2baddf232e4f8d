"""``mechcliff export``: write a model with a head / neuron intervention folded into its weights as a standard
Hugging Face folder that serving engines (vLLM, SGLang, llama.cpp after conversion) load as-is. The logic lives in
:mod:`mechcliff.folding`; the recipe is docs/vllm.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from mechcliff.cli.common import Handler, add_model_flag, done, load, log
from mechcliff.errors import MechcliffError


def add_parsers(sub: Any) -> None:
    """Add ``export`` to ``sub`` (the ``add_subparsers`` object of the ``mechcliff`` parser)."""
    e = sub.add_parser(
        "export", help="save the model with heads / MLP neurons ablated in its weights (a plain HF folder)",
        description="Fold an intervention on heads (scale_z, zero, mean; scale_q where the architecture has no query "
        "norm) and / or MLP neurons into a copy of the model's weights and write a standard Hugging Face folder "
        "(save_pretrained: safetensors, config, tokenizer) plus DIR/mechcliff_edit.json (the edit, the source model "
        "and its weights fingerprint). The folder loads with plain transformers or a serving engine and gives the "
        "hooked model's outputs. norm_preserving cannot be folded (it depends on the activations).")
    add_model_flag(e)
    e.add_argument("--heads", default="", help="heads, comma-separated, e.g. L21H1,L14H0")
    e.add_argument("--mode", default="zero", choices=("zero", "scale_z", "mean", "scale_q"),
                   help="the head intervention (default zero; see mechcliff.interventions)")
    e.add_argument("--gamma", type=float, default=None, help="γ of scale_z / scale_q (default: the mode's)")
    e.add_argument("--neurons", default="", help="MLP neurons, comma-separated, e.g. L3N17,L5N2")
    e.add_argument("--neuron-value", type=float, default=0.0, help="value the neurons are set to (default 0)")
    e.add_argument("--mean-prompts", default=None,
                   help="for --mode mean: prompts whose mean head outputs replace the heads' (a prompt file; default "
                   "the built-in prompts)")
    e.add_argument("--out", required=True, help="folder to write (a Hugging Face model folder)")


def cmd_export(args: argparse.Namespace) -> int:
    from mechcliff.folding import EDIT_FILE, fold

    t0 = time.time()
    heads = [s.strip() for s in args.heads.split(",") if s.strip()]
    neurons = [s.strip() for s in args.neurons.split(",") if s.strip()]
    if not heads and not neurons:
        raise MechcliffError("mechcliff export needs --heads and / or --neurons")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise MechcliffError(f"{out} exists and is not empty: choose a new --out folder")
    h = load(args.model)
    mean_z = None
    if heads and args.mode == "mean":
        from mechcliff.chat import encode
        from mechcliff.data import builtin_prompts, load_prompts
        from mechcliff.interventions import mean_head_outputs

        prompts = load_prompts(args.mean_prompts) if args.mean_prompts else builtin_prompts()
        log(f"mean head outputs over {len(prompts)} prompts ...")
        mean_z = mean_head_outputs(h, encode(h, [p.text for p in prompts]))
    folded = fold(h, heads, mode=args.mode, gamma=args.gamma, mean_z=mean_z, neurons=neurons,
                  neuron_value=args.neuron_value, export=True)
    if mean_z is not None:
        folded.edit["mean_prompts"] = args.mean_prompts or "builtin"
    folded.save(out)
    e = folded.edit
    what = ", ".join(([f"heads {', '.join(e['heads'])} ({e['mode']}, γ={e['gamma']:g})"] if heads else [])
                     + ([f"neurons {', '.join(e['neurons'])} (= {e['neuron_value']:g})"] if neurons else []))
    print(f"{h.model_id}: folded {what}")
    return done([("model folder", out), ("edit", out / EDIT_FILE)], t0)


COMMANDS: dict[str, Handler] = {"export": cmd_export}
