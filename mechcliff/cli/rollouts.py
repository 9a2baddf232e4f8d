"""``mechcliff import-rollouts``: rollouts generated elsewhere (vLLM, an OpenAI-compatible API, a Hugging Face
dataset, STAR-1, mechcliff) into a run folder, for ``mechcliff run --rollouts GROUP=FILE`` to analyse without
generating. The logic lives in :mod:`mechcliff.rollout_import`.
"""

from __future__ import annotations

import argparse
from typing import Any

from mechcliff.cli.common import Handler


def add_parsers(sub: Any) -> None:
    """Add ``import-rollouts`` to ``sub`` (the ``add_subparsers`` object of the ``mechcliff`` parser)."""
    from mechcliff.rollout_import import FORMATS

    p = sub.add_parser(
        "import-rollouts", help="import rollouts written elsewhere (vLLM, OpenAI API, HF datasets, STAR-1) into a run folder",
        description="Read FILE (JSONL, a JSON list or one JSON object), split each generation into thinking and answer "
        "at the think format's tags, and write RUN/rollouts/<group>.jsonl (mechcliff's format) and "
        "RUN/import_report.json (counts; every record not imported, with its line and the reason). Then "
        "'mechcliff run --out RUN --rollouts GROUP=RUN/rollouts/GROUP.jsonl ...' analyses them without generating.",
    )
    p.add_argument("file", metavar="FILE", help="the rollouts to import")
    p.add_argument("--out", required=True, help="the run folder to write them into (created if missing)")
    p.add_argument("--group", default=None,
                   help="the group of every rollout (e.g. harmful, harmless); default: the records' own 'group', "
                   "else 'harmful' for STAR-1")
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="the records' format (default auto: recognised per record by its keys)")
    p.add_argument("--think-format", default="default",
                   help="the think tags the generations were written with: a preset (default: <think> ... </think>, "
                   "as Qwen3, QwQ and DeepSeek-R1 write them; magistral, seed-oss, organism, ...)")
    p.add_argument("--limit", type=int, default=None, help="import only the first N records")
    p.add_argument("--overwrite", action="store_true", help="replace group files already in RUN/rollouts")


def cmd_import_rollouts(args: argparse.Namespace) -> int:
    from mechcliff.rollout_import import IMPORT_REPORT, import_rollouts, save_import

    imported = import_rollouts(args.file, format=args.format, group=args.group, think=args.think_format,
                               limit=args.limit)
    files = save_import(imported, args.out, overwrite=args.overwrite)
    rep = imported.report
    formats = ", ".join(f"{n} {f}" for f, n in rep.formats.items())
    th = rep.thinking
    print(f"{rep.n_imported} rollouts imported from {rep.n_records} records ({formats}); "
          f"{len(rep.skipped)} skipped")
    print(f"thinking: {th['closed']} closed, {th['unclosed']} never closed, {th['none']} none")
    for s in rep.skipped[:5]:
        print(f"  skipped record {s.record}" + (f" (line {s.line})" if s.line else "") + f": {s.reason}")
    if len(rep.skipped) > 5:
        print(f"  ... and {len(rep.skipped) - 5} more (all in the report)")
    for g, f in files.items():
        print(f"{g}: {f}")
    print(f"report: {args.out}/{IMPORT_REPORT}")
    import json
    from pathlib import Path

    every = json.loads((Path(args.out) / IMPORT_REPORT).read_text(encoding="utf-8"))["rollouts"]  # this and earlier
    flags = " ".join(f"--rollouts {g}={f}" for g, f in every.items())
    missing = [g for g in ("harmless", "harmful") if g not in every]
    gen = " ".join(f"--prompts {g}=FILE" for g in missing)
    print(f"next: mechcliff run --model MODEL --out {args.out} {flags}" + (f" {gen}" if gen else "")
          + (f"  (the run needs a 'harmless' and a 'harmful' group: generate the {' and '.join(missing)} one from a "
             "prompt file (FILE; 'builtin' is the built-in set), or import its rollouts the same way)" if missing else ""))
    return 0


COMMANDS: dict[str, Handler] = {"import-rollouts": cmd_import_rollouts}
