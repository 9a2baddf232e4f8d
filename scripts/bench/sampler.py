"""Benchmark: one sampling step of :class:`mechcliff.generation.SeededSampler` (one uniform per row, inverse transform)
against the Gumbel-max trick with the same per-row CPU generators (one uniform per vocabulary entry).

    python scripts/bench/sampler.py [--rows 16] [--vocab 152064] [--threads 1] [--json]

Both run on the same random logits, fastest of 5 steps each. Prints the two times and their ratio; ``--json`` adds
one JSON object on the last line with keys ``seeded_ms``, ``gumbel_ms`` and ``gumbel_vs_seeded``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mechcliff.generation import SeededSampler


def gumbel_step(generators: list[torch.Generator], scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """The Gumbel-max draw: argmax of logits / T plus Gumbel noise, a uniform per entry from each row's generator."""
    u = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in generators])
    return (scores / temperature - torch.log(-torch.log(u.clamp_min(1e-20)))).argmax(-1)


def fastest(step, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=152064, help="default: the Qwen2 / R1-Distill-Qwen vocabulary")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scores = torch.randn(args.rows, args.vocab, generator=torch.Generator().manual_seed(0))
    ids = torch.zeros(args.rows, 1, dtype=torch.long)
    sampler = SeededSampler([torch.Generator().manual_seed(i) for i in range(args.rows)], temperature=0.7)
    gumbel_gens = [torch.Generator().manual_seed(i) for i in range(args.rows)]
    seeded = fastest(lambda: sampler(ids, scores))
    gumbel = fastest(lambda: gumbel_step(gumbel_gens, scores, 0.7))
    print(f"{args.rows} rows x {args.vocab} tokens, {args.threads} thread(s), fastest of 5 steps")
    print(f"  SeededSampler (one uniform per row)      {seeded:8.1f} ms")
    print(f"  Gumbel-max (one uniform per entry)       {gumbel:8.1f} ms   ({gumbel / seeded:.1f}x)")
    if args.json:
        print(json.dumps({"seeded_ms": round(seeded, 2), "gumbel_ms": round(gumbel, 2),
                          "gumbel_vs_seeded": round(gumbel / seeded, 2)}))


if __name__ == "__main__":
    main()
