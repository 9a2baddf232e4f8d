"""The ``mechcliff`` command line: the same code as the Python API.

User errors (bad input, missing files) end in one line ``mechcliff: error: ...`` and exit status 2, without a
traceback; set ``MECHCLIFF_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mechcliff.errors import MechcliffError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mechcliff",
        description="Mechanistic interpretability of the refusal cliff in reasoning language models.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    r = sub.add_parser(
        "run", help="run the whole pipeline (rollouts, probe, trace, attribution, ablation, report)",
        description="Run (or resume) the refusal-cliff pipeline and write DIR/results.json, DIR/report.html, "
        "DIR/manifest.json and each stage's saved results. Finished stages are not recomputed.",
    )
    r.add_argument("--model", default=None,
                   help="'organism' (built-in, default), 'smollm2-135m-instruct', a local HF folder, a .gguf file, "
                   "or a Hugging Face id (needs network)")
    r.add_argument("--out", required=True, help="run folder to write (created if missing; resumed if present)")
    r.add_argument("--config", default=None, help="JSON or TOML file of RunConfig options (see mechcliff.pipeline)")
    r.add_argument("--quick", action="store_true", help="a quick run: 40 prompts per group, shorter generations, 2 random-head sets on real models")
    r.add_argument("--seed", type=int, default=None, help="seed for generation, probe split and random heads")
    r.add_argument("--n-per-group", type=int, default=None, help="use at most this many prompts per group")
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")
    c = sub.add_parser("check", help="load a model and print its conformance report",
                       description="Load MODEL and run the hook conformance check (shapes, head sums, residual "
                       "additivity, logits vs Hugging Face).")
    c.add_argument("model", help="model spec, as for 'run --model'")
    return p


def fmt(value: object, digits: int = 2) -> str:
    """A number for people: ``n/a`` for undefined (None / NaN) values."""
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else str(value)


def _run(args: argparse.Namespace) -> int:
    from mechcliff.pipeline import RunConfig, default_config, run_pipeline

    overrides = {"model": args.model, "seed": args.seed, "n_per_group": args.n_per_group,
                 "quick": True if args.quick else None}
    if args.config:
        cfg = RunConfig.from_file(args.config, **overrides)
    else:
        cfg = default_config(args.model or "organism", quick=args.quick)
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
        cfg.validate()
    results = run_pipeline(cfg.model, args.out, config=cfg, progress=not args.no_progress)
    out = Path(args.out)
    ab = results["ablation"]
    print(f"probe: layer {results['probe']['layer']}, val accuracy {fmt(results['probe']['val_accuracy'], 3)}")
    print(f"top suppression heads: {', '.join(results['attribution']['top_suppression_heads'][:5])}")
    print(f"ASR before {fmt(ab['asr_before'])}, after ablating {len(ab['heads'])} heads {fmt(ab['asr_after'])}, "
          f"random heads {fmt(ab['asr_random_heads'])}")
    print(f"results: {out / 'results.json'}")
    print(f"report:  {(out / 'report.html').resolve()}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from mechcliff.model.loading import load_model

    h = load_model(args.model)
    print(h)
    print(h.conformance.summary() if h.conformance else "no conformance report")
    return 0 if h.conformance is None or h.conformance.passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return {"run": _run, "check": _check}[args.command](args)
    except MechcliffError as exc:
        if os.environ.get("MECHCLIFF_DEBUG"):
            raise
        print(f"mechcliff: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mechcliff: interrupted; finished stages are kept, re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
