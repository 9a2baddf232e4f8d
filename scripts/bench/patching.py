"""Benchmark: the batched, prefix-reusing head-patching engine vs the one-forward-per-index reference.

    python scripts/bench/patching.py [--model smollm2-135m-instruct] [--pairs 16] [--layers all|0,10,20] [--json]

Both run side by side in one process on the same pairs (harmful prompts as source, harmless as target, each with
a short fixed thinking, patched at ``think_end``) and the same heads, with a probe-logit metric on the last layer.
Prints seconds, the speed-up and the max abs difference; ``--json`` adds one JSON object on the last line with
keys ``speedup`` and ``max_abs_diff``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--layers", default="all", help="'all' or comma-separated layer indices to patch")
    ap.add_argument("--max-rows", type=int, default=144)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from mechcliff import LinearProbe, builtin_prompts, encode, load_model
    from mechcliff.patching import ProbeMetric, patch_heads, patch_heads_reference

    h = load_model(args.model)
    harmful = [p.text for p in builtin_prompts("harmful")][: args.pairs]
    harmless = [p.text for p in builtin_prompts("harmless")][: args.pairs]
    think = ["Let me think about what is being asked here."] * args.pairs
    source, target = encode(h, harmful, thinking=think), encode(h, harmless, thinking=think)
    layers = range(h.n_layers) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    heads = [(l, hd) for l in layers for hd in range(h.n_heads)]
    w = np.random.default_rng(0).standard_normal(h.d_model)
    probe = LinearProbe(w=w * 0.05 / np.linalg.norm(w), b=0.0, layer=h.n_layers - 1, model_id=h.model_id,
                        model_hash=h.model_hash)
    metric = ProbeMetric(probe)
    t = time.perf_counter()
    fast = patch_heads(h, target, source, metric, heads=heads, max_rows=args.max_rows)
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    ref = patch_heads_reference(h, target, source, metric, heads=heads)
    t_ref = time.perf_counter() - t
    ok = ~np.isnan(ref.per_example)
    diff = float(np.abs(fast.per_example[ok] - ref.per_example[ok]).max())
    print(f"model {h.model_id}: {len(heads)} heads x {args.pairs} pairs ({target.tokens.shape[1]} tokens), "
          f"max_rows {args.max_rows}")
    print(f"{'method':40s} {'seconds':>9s}")
    print(f"{'engine (batched, prefix reused)':40s} {t_fast:9.2f}")
    print(f"{'reference (one forward per head)':40s} {t_ref:9.2f}")
    print(f"speed-up {t_ref / t_fast:.2f}x, max |engine - reference| = {diff:.2e}")
    if args.json:
        print(json.dumps({"model": h.model_id, "heads": len(heads), "pairs": args.pairs, "speedup": t_ref / t_fast,
                          "max_abs_diff": diff, "seconds_engine": t_fast, "seconds_reference": t_ref}))


if __name__ == "__main__":
    main()
