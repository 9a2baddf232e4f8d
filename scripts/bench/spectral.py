"""Benchmark: batched spectral head metrics (B1/B2/B3) vs the paper's per-head, per-row loop.

    python scripts/bench/spectral.py [--model smollm2-135m-instruct] [--texts 32] [--layers all|0,10,20] [--json]

The attention patterns of every head of the chosen layers are read once (one batched forward; its time is printed
but not compared), on ``--texts`` built-in prompts (half harmless = safe, half harmful = unsafe) each followed by a
short fixed thinking, up to ``think_end``. Then, side by side in one process on the same patterns:

* reference: :func:`mechcliff.spectral.spectral_head_metrics_reference`, the authors' loop (per text, layer and head:
  resample the pattern; per row: 20 power-iteration steps and ``numpy.linalg.eigvalsh``);
* batched, ``lambda_method="power"``: the same algorithm for all heads and rows at once, same start vectors;
* batched, ``lambda_method="exact"`` (the default): exact top eigenpair by the secular equation, ``eigvalsh`` of the
  kept rows only;
* batched, ``lambda_method="exact", solver="eigh"``: dense batched ``eigh`` of every row.

Prints seconds, speed-ups and max abs differences of B1, B3 and the B2 centroid. ``speedup`` / ``max_abs_diff`` (the
``--json`` keys) compare the batched power iteration with the reference (same algorithm: must agree to 1e-4); the
``exact`` lines also show how far the paper's 20-step power iteration is from the exact values.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import torch


def _diffs(a, b) -> dict[str, float]:
    return {m: float(np.abs(a.values(m) - b.values(m)).max()) for m in ("b1", "b3", "b2")}


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    try:  # numpy's BLAS on one thread too (the reference's eigvalsh), for a like-for-like comparison
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--texts", type=int, default=32)
    ap.add_argument("--layers", default="all", help="'all' or comma-separated layer indices")
    ap.add_argument("--no-eigh", action="store_true", help="skip the dense-eigh variant")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from mechcliff import builtin_prompts, encode, load_model
    from mechcliff.spectral import attention_blocks, spectral_head_metrics_reference

    h = load_model(args.model)
    n_safe = args.texts // 2
    safe_p = [p.text for p in builtin_prompts("harmless")][:n_safe]
    unsafe_p = [p.text for p in builtin_prompts("harmful")][: args.texts - n_safe]
    think = "Let me think about what is being asked here and whether answering it could cause any harm."
    safe = encode(h, safe_p, thinking=[think] * len(safe_p))
    unsafe = encode(h, unsafe_p, thinking=[think] * len(unsafe_p))
    layers = list(range(h.n_layers)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    lengths = [int(safe.position("think_end")[i]) - safe.pad_lengths[i] + 1 for i in range(len(safe))]
    lengths += [int(unsafe.position("think_end")[i]) - unsafe.pad_lengths[i] + 1 for i in range(len(unsafe))]

    t = time.perf_counter()
    raw = attention_blocks(h, safe, layers=layers, size=None) + attention_blocks(h, unsafe, layers=layers, size=None)
    t_fwd = time.perf_counter() - t
    is_safe = [1] * len(safe) + [0] * len(unsafe)

    t = time.perf_counter()
    ref = spectral_head_metrics_reference(raw, is_safe, layers)
    t_ref = time.perf_counter() - t

    from mechcliff.spectral import ROWS, SIZE, spectral_head_metrics_from_blocks

    def batched(method: str, solver: str = "secular"):  # the batched path, from the same captured patterns
        t0 = time.perf_counter()
        res = spectral_head_metrics_from_blocks(raw, is_safe, layers, lambda_method=method, solver=solver)
        return res, time.perf_counter() - t0

    power, t_power = batched("power")
    exact, t_exact = batched("exact")
    d_power, d_exact = _diffs(power, ref), _diffs(exact, ref)
    b1_err = exact.values("b1") - ref.values("b1")
    rows_differ = float((exact.row != ref.row).mean())
    if not args.no_eigh:
        eigh, t_eigh = batched("exact", "eigh")
        d_eigh_exact = _diffs(eigh, exact)

    n_heads = len(raw) * len(layers) * h.n_heads
    print(f"model {h.model_id}: {len(raw)} texts ({min(lengths)}-{max(lengths)} tokens), {len(layers)} layers x "
          f"{h.n_heads} heads = {n_heads} patterns, {SIZE}x{SIZE}, {ROWS} rows each; forward {t_fwd:.2f} s (not timed)")
    print(f"{'method':52s} {'seconds':>9s} {'speed-up':>9s}")
    print(f"{'reference (per head, per row, power iteration)':52s} {t_ref:9.2f} {1.0:8.1f}x")
    print(f"{'batched, power iteration (same starts)':52s} {t_power:9.2f} {t_ref / t_power:8.1f}x")
    print(f"{'batched, exact (secular λ_max, eigvalsh kept rows)':52s} {t_exact:9.2f} {t_ref / t_exact:8.1f}x")
    if not args.no_eigh:
        print(f"{'batched, exact (dense eigh of every row)':52s} {t_eigh:9.2f} {t_ref / t_eigh:8.1f}x")
    fmt = lambda d: ", ".join(f"{k.upper()} {v:.1e}" for k, v in d.items())  # noqa: E731
    print(f"max |batched power - reference|: {fmt(d_power)}")
    print(f"max |batched exact - reference|: {fmt(d_exact)}  (the reference's 20 power steps vs exact; kept row "
          f"differs for {rows_differ:.2%} of heads; |ΔB1| > 1e-4 for {float((np.abs(b1_err) > 1e-4).mean()):.2%})")
    if not args.no_eigh:
        print(f"max |dense eigh - secular|: {fmt(d_eigh_exact)}")
    diff = max(d_power["b1"], d_power["b3"])
    print(f"speed-up {t_ref / t_power:.1f}x (power) / {t_ref / t_exact:.1f}x (exact); max |batched power - reference| "
          f"over B1, B3 = {diff:.2e}")
    if args.json:
        out = {"model": h.model_id, "texts": len(raw), "patterns": n_heads, "speedup": t_ref / t_power,
               "max_abs_diff": diff, "max_abs_diff_b2_centroid": d_power["b2"], "speedup_exact": t_ref / t_exact,
               "max_abs_diff_exact_vs_reference": max(d_exact["b1"], d_exact["b3"]),
               "seconds_reference": t_ref, "seconds_power": t_power, "seconds_exact": t_exact,
               "seconds_forward": t_fwd}
        if not args.no_eigh:
            out.update(seconds_eigh=t_eigh, speedup_eigh=t_ref / t_eigh,
                       max_abs_diff_eigh_vs_secular=max(d_eigh_exact.values()))
        print(json.dumps(out))


if __name__ == "__main__":
    main()
