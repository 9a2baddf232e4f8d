"""Benchmark: trace, attribution and head patching at reasoning lengths, against a bare forward pass.

    python scripts/bench/long_context.py [--model smollm2-135m-instruct] [--lengths 512,1024,2048,4096] [--json]

For each length T, one row of T tokens (random ids; the cost does not depend on the text) is run by each step in
its own subprocess, which reports the step's time (the fastest of ``--repeats`` runs, after a short warm-up) and the
extra peak resident memory it needed above the loaded model (the peak is reset before each run):

* ``hf``: the plain Hugging Face forward (the model's own sdpa attention, no bridge, no hooks), logits included;
* ``hf_body``: the same without the unembedding (the decoder stack alone: the floor of any activation read);
* ``forward``: a bare forward pass through the TransformerBridge (its own attention, which materialises the scores);
The analyses load the model as users do (conformance check included), so they read activations on the fast path
(:mod:`mechcliff.model.plain`) wherever the check verified it; ``--bridge`` reads everything through the bridge:

* ``trace``: :func:`mechcliff.trace.trace_refusal` (probe score at every token) with a probe at the last layer;
* ``attribution``: :func:`mechcliff.attribution.direct_probe_attribution` at the last token;
* ``patching``: :func:`mechcliff.patching.patch_heads` of every head for one pair (``--patching-lengths``).

Prints, per length, each step's time and memory as a ratio to the bridge forward and to the HF forward, and the
fitted growth exponent of time in T (log-log slope; attention itself is quadratic, so the forward's own exponent
is printed beside). ``--json`` adds one object on the last line: ``trace_time_ratio``, ``attribution_time_ratio``,
``peak_memory_ratio`` (worst over lengths and steps, vs the bridge forward), ``time_exponent`` (worst of trace and
attribution), ``forward_exponent``, and vs the HF forward ``trace_vs_hf``, ``attribution_vs_hf``, ``memory_vs_hf``,
``patching_per_head_vs_hf`` (all heads' time / number of heads / one HF forward).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
import warnings

STEPS = ("hf", "hf_body", "forward", "trace", "attribution", "patching")


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_peak() -> float:
    """Reset the peak resident memory to the current one (Linux: ``clear_refs`` 5); returns the current RSS (MB).
    Without it the peak of loading the model (and of its conformance check) would hide the step's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_mb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_rss_mb() -> float:
    return _status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore")
    import numpy as np
    import torch

    from mechcliff.chat import EncodedBatch
    from mechcliff.model.loading import load_hf_model, load_model
    from mechcliff.model.plain import verified_sites
    from mechcliff.probe import LinearProbe

    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    T = args.tokens
    if args.step in ("hf", "hf_body"):
        hf, *_ = load_hf_model(args.model)
        vocab = hf.config.vocab_size
    else:
        h = load_model(args.model, check=True)
        if args.bridge:
            h.extra["fast_reads"] = False
        vocab = h.hf_model.config.vocab_size
    tokens = torch.randint(10, vocab, (1, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    span = {"prefix": (0, 1), "prompt": (0, 1), "thinking": (1, T - 2), "closing": (T - 2, T - 1), "answer": (T - 1, T)}
    batch = EncodedBatch(tokens=tokens, attention_mask=mask, spans=[span], has_think_close=[True], pad_lengths=[0])

    if args.step == "hf":
        def run() -> None:
            hf(input_ids=tokens, attention_mask=mask)
    elif args.step == "hf_body":
        def run() -> None:
            hf.base_model(input_ids=tokens, attention_mask=mask, use_cache=False)
    else:
        from mechcliff.attribution import direct_probe_attribution
        from mechcliff.model.capture import forward
        from mechcliff.patching import patch_heads
        from mechcliff.trace import trace_refusal

        rng = np.random.default_rng(0)
        probe = LinearProbe(w=rng.normal(size=h.d_model) / math.sqrt(h.d_model), b=0.0, layer=h.n_layers - 1,
                            model_id=h.model_id, model_hash=h.model_hash)

        def run() -> None:
            if args.step == "forward":
                forward(h, tokens, mask)
            elif args.step == "trace":
                trace_refusal(h, batch, probe)
            elif args.step == "attribution":
                direct_probe_attribution(h, batch, probe, position="last")
            else:
                patch_heads(h, batch, batch, probe, target_position="last", source_position="last")

    warm = args.step != "patching"  # one short run first: lazy initialisation is not the step's cost
    if warm:
        full, full_mask, full_batch = tokens, mask, batch
        tokens, mask = tokens[:, :16], mask[:, :16]
        short = {"prefix": (0, 1), "prompt": (0, 1), "thinking": (1, 14), "closing": (14, 15), "answer": (15, 16)}
        batch = EncodedBatch(tokens=tokens, attention_mask=mask, spans=[short], has_think_close=[True], pad_lengths=[0])
        run()
        tokens, mask, batch = full, full_mask, full_batch
    import gc

    seconds, peak = float("inf"), 0.0
    for _ in range(args.repeats if warm else 1):  # the fastest of a few runs: a busy machine only slows one down
        gc.collect()
        base = reset_peak()
        t = time.perf_counter()
        run()
        seconds = min(seconds, time.perf_counter() - t)
        peak = max(peak, peak_rss_mb() - base)
    hf_step = args.step in ("hf", "hf_body")
    print(json.dumps({"seconds": seconds, "peak_mb": max(0.0, peak),
                      "heads": None if hf_step else h.n_layers * h.n_heads,
                      "plain_sites": None if hf_step else len(verified_sites(h))}))


def measure(model: str, step: str, tokens: int, threads: int, bridge: bool = False, repeats: int = 3
            ) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--worker", step, "--model", model, "--tokens", str(tokens),
                          "--threads", str(threads), "--repeats", str(repeats), *(["--bridge"] if bridge else [])],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{step} at {tokens} tokens failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def slope(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lengths", default="512,1024,2048,4096")
    ap.add_argument("--patching-lengths", default="512,1024",
                    help="lengths at which head patching (every head, one pair) is also timed (default 512,1024)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs per step (the fastest is reported; head patching runs once; default 3)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--bridge", action="store_true", help="read every activation through the bridge (the slow path)")
    ap.add_argument("--worker", default=None, choices=STEPS, dest="step", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=512, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        worker(args)
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    patch_at = {int(x) for x in args.patching_lengths.split(",") if x}
    rows: dict[int, dict[str, dict[str, float]]] = {}
    print(f"{'tokens':>7} {'step':>12} {'seconds':>9} {'peak MB':>9} {'time/fwd':>9} {'time/HF':>8} "
          f"{'mem/fwd':>8} {'mem/HF':>7}")
    for T in lengths:
        r = rows[T] = {}
        for step in STEPS:
            if step == "patching" and T not in patch_at:
                continue
            r[step] = measure(args.model, step, T, args.threads, args.bridge, args.repeats)
        fwd, hf = r["forward"], r["hf"]
        for step, m in r.items():
            print(f"{T:7d} {step:>12} {m['seconds']:9.2f} {m['peak_mb']:9.1f} {m['seconds'] / fwd['seconds']:9.2f} "
                  f"{m['seconds'] / hf['seconds']:8.2f} {m['peak_mb'] / max(fwd['peak_mb'], 1.0):8.2f} "
                  f"{m['peak_mb'] / max(hf['peak_mb'], 1.0):7.2f}")
    exps = {s: slope(lengths, [rows[T][s]["seconds"] for T in lengths])
            for s in ("hf", "hf_body", "forward", "trace", "attribution")}
    sites = {rows[T][s].get("plain_sites") for T in lengths for s in ("trace", "attribution")}
    print(f"activations read on the plain HF model: {'no (--bridge)' if args.bridge else sites} sites verified")
    print("time exponent in T: " + ", ".join(f"{s} {e:.2f}" for s, e in exps.items())
          + " (attention is quadratic: the forward's own exponent is the floor)")
    patch_rows = [(T, rows[T]["patching"]) for T in lengths if "patching" in rows[T]]
    for T, m in patch_rows:
        per_head = m["seconds"] / m["heads"] / rows[T]["hf"]["seconds"]
        print(f"patching at {T} tokens: {m['seconds']:.1f} s for {m['heads']:.0f} heads = {per_head:.3f} HF forwards "
              "per head")
    if args.json:
        def worst(step: str, ref: str, key: str = "seconds") -> float:
            return max(rows[T][step][key] / max(rows[T][ref][key], 1e-9 if key == "seconds" else 1.0) for T in lengths)

        summary = {
            "trace_time_ratio": worst("trace", "forward"), "attribution_time_ratio": worst("attribution", "forward"),
            "peak_memory_ratio": max(worst(s, "forward", "peak_mb") for s in ("trace", "attribution")),
            "time_exponent": max(exps["trace"], exps["attribution"]), "forward_exponent": exps["forward"],
            "hf_exponent": exps["hf"], "hf_body_exponent": exps["hf_body"],
            "trace_vs_hf_body": worst("trace", "hf_body"), "attribution_vs_hf_body": worst("attribution", "hf_body"),
            "trace_vs_hf": worst("trace", "hf"), "attribution_vs_hf": worst("attribution", "hf"),
            "memory_vs_hf": max(worst(s, "hf", "peak_mb") for s in ("trace", "attribution")),
            "patching_per_head_vs_hf": max((m["seconds"] / m["heads"] / rows[T]["hf"]["seconds"] for T, m in patch_rows),
                                           default=float("nan")),
            "lengths": lengths,
        }
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
