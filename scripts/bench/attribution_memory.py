"""Benchmark: direct probe attribution through ``hook_z`` vs TransformerLens ``stack_head_results``.

    python scripts/bench/attribution_memory.py [--model smollm2-135m-instruct] [--batch 8] [--tokens 512] [--json]

Each method runs in its own subprocess (same model, same random batch), which reports the extra peak resident
memory the operation needed above the loaded model, and its time next to a bare forward pass (hooks off) timed in
the same process. Prints the table; ``--json`` adds one JSON object on the last line with keys
``peak_memory_ratio`` (stack_head_results / hook_z) and ``time_ratio_vs_forward`` (hook_z / bare forward).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore")
    import numpy as np
    import torch

    from mechcliff import LinearProbe, direct_probe_attribution, load_model
    from mechcliff.chat import EncodedBatch

    torch.set_grad_enabled(False)
    h = load_model(args.model, check=False)
    T, B = args.tokens, args.batch
    tokens = torch.randint(10, h.hf_model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    span = {"prefix": (0, T), "prompt": (0, T), "thinking": (0, T), "closing": (T - 1, T), "answer": (T, T)}
    batch = EncodedBatch(tokens=tokens, attention_mask=torch.ones_like(tokens), spans=[span] * B,
                         has_think_close=[True] * B, pad_lengths=[0] * B)
    layer = h.n_layers - 1
    w = np.random.default_rng(0).standard_normal(h.d_model)
    probe = LinearProbe(w=w, b=0.0, layer=layer, model_id=h.model_id, model_hash=h.model_hash)
    h.bridge(tokens[:1, :8])  # warm-up
    t = time.perf_counter()
    h.bridge(tokens)
    bare = time.perf_counter() - t
    base = peak_rss_mb()
    t = time.perf_counter()
    if args.method == "hook_z":
        res = direct_probe_attribution(h, batch, probe, position="last", batch_size=B).per_example[:, : layer + 1]
    else:
        _, cache = h.bridge.run_with_cache(tokens, names_filter=lambda n: n.endswith("attn.hook_z"))
        stacked = cache.stack_head_results(layer=layer + 1)  # [heads, batch, pos, d_model]
        res = (stacked[:, :, -1] @ torch.as_tensor(w, dtype=stacked.dtype)).T.reshape(B, layer + 1, h.n_heads).numpy()
    elapsed = time.perf_counter() - t
    print(json.dumps({"seconds": elapsed, "bare_forward": bare, "extra_peak_mb": peak_rss_mb() - base,
                      "checksum": float(np.nansum(res)), "first": float(res[0, 0, 0])}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--method", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        worker(args)
        return
    runs = {}
    for method in ("hook_z", "stack_head_results"):
        cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--tokens",
               str(args.tokens), "--method", method]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        runs[method] = json.loads(out)
    ours, theirs = runs["hook_z"], runs["stack_head_results"]
    print(f"model {args.model}: batch {args.batch} x {args.tokens} tokens, attribution at the last position")
    print(f"{'method':28s} {'seconds':>8s} {'x bare forward':>15s} {'extra peak MB':>14s}")
    for name, r in runs.items():
        print(f"{name:28s} {r['seconds']:8.2f} {r['seconds'] / r['bare_forward']:15.2f} {r['extra_peak_mb']:14.1f}")
    ratio = theirs["extra_peak_mb"] / max(ours["extra_peak_mb"], 1.0)
    print(f"peak memory ratio (stack_head_results / hook_z): {ratio:.1f}x (hook_z extra peak floored at 1 MB)")
    print(f"checksums agree: {abs(ours['checksum'] - theirs['checksum']) <= 1e-3 * max(1.0, abs(ours['checksum']))}")
    if args.json:
        print(json.dumps({"model": args.model, "peak_memory_ratio": ratio,
                          "time_ratio_vs_forward": ours["seconds"] / ours["bare_forward"],
                          "stack_time_ratio_vs_forward": theirs["seconds"] / theirs["bare_forward"]}))


if __name__ == "__main__":
    main()
