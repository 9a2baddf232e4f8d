"""Compare two run folders' results.json field by field (a refactor must leave the demo's numbers unchanged).

    python scripts/compare_runs.py runs/before runs/after [--tol 0]

Prints every field that differs (missing keys, types, lengths, values beyond ``--tol``) and exits 1 if any does.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any


def differences(a: Any, b: Any, tol: float = 0.0, path: str = "") -> list[str]:
    """Every difference between two JSON documents, as ``path: detail`` lines."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: only in {'first' if k in a else 'second'}" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += differences(a[k], b[k], tol, f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, tol, f"{path}[{i}]")]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        same = (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol
        return [] if same else [f"{path}: {a!r} vs {b!r}"]
    return [] if a == b and type(a) is type(b) else [f"{path}: {a!r} vs {b!r}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first", type=Path)
    ap.add_argument("second", type=Path)
    ap.add_argument("--tol", type=float, default=0.0, help="absolute tolerance for numbers (default 0: identical)")
    args = ap.parse_args(argv)
    docs = [json.loads((d / "results.json").read_text()) for d in (args.first, args.second)]
    diffs = differences(*docs, tol=args.tol)
    for d in diffs:
        print(d)
    print(f"{len(diffs)} difference(s) between {args.first}/results.json and {args.second}/results.json")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
