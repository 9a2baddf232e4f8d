"""``mechcliff check MODEL``: load a model and print its conformance report and the package versions.

The logic lives in :mod:`mechcliff.model.loading` (the conformance check runs at every load) and
:mod:`mechcliff.versions`.
"""

from __future__ import annotations

import argparse
from typing import Any

from mechcliff.cli.common import Handler


def add_parsers(sub: Any) -> None:
    """Add ``check`` to ``sub`` (the ``add_subparsers`` object of the ``mechcliff`` parser)."""
    c = sub.add_parser("check", help="load a model and print its conformance report",
                       description="Load MODEL, run the conformance check (hook shapes and firing, head sums, "
                       "residual additivity, logits and greedy generation vs the unwrapped Hugging Face model, padded "
                       "vs one-at-a-time, KV-cached continuation, nested hooks) and report the package versions and "
                       "whether they are the tested ones. Exit 2 when a check fails (unless --no-check).")
    c.add_argument("model", help="model spec, as for 'run --model'")
    c.add_argument("--adapter", default=None, help="fine-tuned weights to apply (a folder written by 'mechcliff repair')")


def cmd_check(args: argparse.Namespace) -> int:
    from mechcliff.model.loading import load_model
    from mechcliff.versions import environment_report, untested_summary

    h = load_model(args.model, adapter=args.adapter)
    print(h)
    env = environment_report()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    print("tested versions: yes (the lock)" if env["tested"] else f"tested versions: NO -- {untested_summary()}")
    print(h.conformance.summary() if h.conformance else "conformance: not checked (--no-check)")
    return 0 if h.conformance is None or h.conformance.passed else 1


COMMANDS: dict[str, Handler] = {"check": cmd_check}
