"""Benchmark: the cost of mechcliff's analyses relative to the bare forward pass, measured side by side.

    python scripts/bench/attribution.py [--model organism|smollm2-135m-instruct|PATH] [--batch 8] [--tokens 256]

Prints one row per operation: seconds (median of --repeats) and the ratio to a bare forward pass of the same
batch. Compared: bare forward; probe trace (resid_post at one layer, all positions); direct probe attribution
through ``hook_z`` reduced at the position (mechcliff); the same attribution from a cached ``hook_z`` of every
layer + TransformerLens ``ActivationCache.stack_head_results`` (the usual route), whose results must agree.
``--json`` adds one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import numpy as np
import torch


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="organism")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from mechcliff import LinearProbe, direct_probe_attribution, load_model
    from mechcliff.chat import EncodedBatch
    from mechcliff.trace import probe_scores_all_positions

    h = load_model(args.model)
    g = torch.Generator().manual_seed(0)
    vocab = h.hf_model.config.vocab_size
    tokens = torch.randint(10, vocab, (args.batch, args.tokens), generator=g)
    batch = EncodedBatch(tokens=tokens, attention_mask=torch.ones_like(tokens),
                         spans=[{"prefix": (0, args.tokens), "prompt": (0, args.tokens), "thinking": (0, args.tokens),
                                 "closing": (args.tokens - 1, args.tokens), "answer": (args.tokens, args.tokens)}] * args.batch,
                         has_think_close=[True] * args.batch, pad_lengths=[0] * args.batch)
    layer = h.n_layers - 1
    probe = LinearProbe(w=np.random.default_rng(0).standard_normal(h.d_model), b=0.0, layer=layer,
                        model_id=h.model_id, model_hash=h.model_hash)
    pos = batch.position("last")

    def bare():
        with torch.no_grad():
            h.bridge(tokens)

    def trace():
        probe_scores_all_positions(h, batch, probe, batch_size=args.batch)

    def dpa():
        return direct_probe_attribution(h, batch, probe, position="last", batch_size=args.batch)

    def stacked():
        with torch.no_grad():
            _, cache = h.bridge.run_with_cache(tokens, names_filter=lambda n: n.endswith("attn.hook_z"))
            res = cache.stack_head_results(layer=layer + 1)  # [heads, batch, pos, d_model]
            w = torch.as_tensor(probe.w, dtype=res.dtype)
            return (res[:, torch.arange(args.batch), pos] @ w).T.reshape(args.batch, layer + 1, h.n_heads)

    t_bare = timed(bare, args.repeats)
    rows = [("bare forward", t_bare), ("probe trace, all positions", timed(trace, args.repeats)),
            ("DPA via hook_z (mechcliff)", timed(dpa, args.repeats)),
            ("DPA via stack_head_results (TL cache)", timed(stacked, args.repeats))]
    ours = dpa().per_example[:, : layer + 1]
    ref = stacked().double().numpy()
    diff = float(np.abs(ours - ref).max())
    print(f"model {h.model_id}: batch {args.batch} x {args.tokens} tokens, {h.n_layers} layers x {h.n_heads} heads")
    print(f"{'operation':42s} {'seconds':>9s} {'x bare forward':>15s}")
    for name, t in rows:
        print(f"{name:42s} {t:9.3f} {t / t_bare:15.2f}")
    print(f"max |DPA(hook_z) - DPA(stack_head_results)| = {diff:.2e}")
    if args.json:
        print(json.dumps({"model": h.model_id, "time_ratio_vs_forward": rows[2][1] / t_bare,
                          "time_ratio_stack_head_results_vs_forward": rows[3][1] / t_bare,
                          "trace_ratio_vs_forward": rows[1][1] / t_bare, "max_abs_diff": diff}))


if __name__ == "__main__":
    main()
