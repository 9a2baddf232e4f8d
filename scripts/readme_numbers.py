"""The README's measured numbers of the demo, generated from a run folder so that they cannot go stale.

    python scripts/readme_numbers.py runs/demo            # print the paragraph
    python scripts/readme_numbers.py runs/demo --write    # put it into README.md between its markers

``tests/test_pipeline_cli.py`` runs the demo's configuration and checks that README.md holds exactly the paragraph
this script writes for it. Numbers only: timings vary from machine to machine and are not generated.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- readme_numbers: demo -->", "<!-- /readme_numbers -->"


def _rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _bound(x: float, bound: float) -> str:
    """Float error as a bound (``< 1e-04``): its last digits vary with thread count and BLAS, the bound does not."""
    return f"< {bound:.0e}" if x < bound else f"= {x:.1e}"


def demo_paragraph(results: dict) -> str:
    """The organism paragraph of the README, from a run's ``results.json``."""
    p, groups, a, b = results["probe"], results["cliff"]["groups"], results["attribution"], results["ablation"]
    planted = results.get("organism", {})
    k = len(b["heads"])
    exact = "exactly the planted heads" if planted.get("recovered_top_k") else f"{', '.join(a['top_suppression_heads'][:k])}"
    n = groups["harmful_jailbreak"]["n"]
    return (
        f"On `make demo` (organism, {n} prompts per group): probe val accuracy {p['val_accuracy']:.2f} at layer "
        f"{p['layer']}; MS {groups['harmful_jailbreak']['ms']:.2f} for jailbreaks vs {groups['harmful']['ms']:.2f} for "
        f"plain harmful prompts; the top-{k} suppression heads by attribution are {exact} ({', '.join(b['heads'])}; "
        f"max |Σ components − logit| {_bound(a['exact_max_abs_error'], 1e-4)}, relative "
        f"{_bound(a['exact_relative_error'], 1e-6)}); ASR "
        f"{_rate(b['asr_before'])} before, {_rate(b['asr_after'])} after ablating them, "
        f"{_rate(b['asr_random_heads'])} with {len(b['asr_random_heads_sets'])} random sets of {k} heads; harmless "
        f"refusal {_rate(b['harmless_refusal_before'])} before and {_rate(b['harmless_refusal_after'])} after."
    )


def block(results: dict) -> str:
    return f"{START}\n{demo_paragraph(results)}\n{END}"


def readme_block(text: str) -> str | None:
    m = re.search(re.escape(START) + r".*?" + re.escape(END), text, re.S)
    return m.group(0) if m else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a run folder of the demo (mechcliff run --model organism --out DIR)")
    ap.add_argument("--write", action="store_true", help="write the paragraph into README.md")
    args = ap.parse_args()
    results = json.loads((Path(args.run_dir) / "results.json").read_text())
    new = block(results)
    if not args.write:
        print(new)
        return 0
    text = README.read_text()
    old = readme_block(text)
    if old is None:
        print(f"README.md has no {START} ... {END} block", file=sys.stderr)
        return 1
    README.write_text(text.replace(old, new))
    print("README.md updated" if old != new else "README.md already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
