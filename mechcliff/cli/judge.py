"""``mechcliff judge`` (one verdict per rollout of a JSONL file, resumable) and ``mechcliff agree`` (agreement of two
verdict files). The logic lives in :mod:`mechcliff.judges` and :mod:`mechcliff.judging`.
"""

from __future__ import annotations

import argparse
from typing import Any

from mechcliff.cli.common import Handler
from mechcliff.errors import MechcliffError
from mechcliff.fmt import fmt


def add_parsers(sub: Any) -> None:
    """Add ``judge`` and ``agree`` to ``sub`` (the ``add_subparsers`` object of the ``mechcliff`` parser)."""
    j = sub.add_parser(
        "judge", help="judge a JSONL file of rollouts (one verdict per line, resumable)",
        description="Judge each record (prompt, response, optional thinking) of --input and write one verdict per "
        "line to --out: {index, id, refused, judge, judge_version}. Re-running resumes; nothing written is lost.",
    )
    j.add_argument("--input", help="JSONL rollouts with 'prompt' and 'response' (and 'thinking' if present)")
    j.add_argument("--judge", default="refusal",
                   help="judge name, or 'list' to list them: refusal (phrase list on the answer), probe (needs "
                   "--model and --probe), classifier (needs --classifier), guard (needs --judge-model)")
    j.add_argument("--out", help="verdicts file (JSONL) to write or resume")
    j.add_argument("--model", help="for --judge probe: the model the probe was trained on")
    j.add_argument("--probe", help="for --judge probe: a saved probe folder (e.g. RUN/probe)")
    j.add_argument("--classifier", help="for --judge classifier: a local HF sequence-classification model folder")
    j.add_argument("--judge-model", metavar="DIR",
                   help="for --judge guard: a local Llama Guard 3 / 4 or HarmBench classifier folder (no model hub)")
    j.add_argument("--guard-format", choices=("auto", "llama-guard", "harmbench"), default="auto",
                   help="for --judge guard: the guard's prompt and verdict format (auto: harmbench when the folder's "
                   "name says so, else llama-guard)")
    j.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    a = sub.add_parser("agree", help="agreement between two verdict files (raw agreement, Cohen's kappa)",
                       description="Compare two verdict files written by 'mechcliff judge' on the same input.")
    a.add_argument("verdicts_a", help="a verdicts file written by 'mechcliff judge'")
    a.add_argument("verdicts_b", help="another one, on the same input")
    a.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_judge(args: argparse.Namespace) -> int:
    from mechcliff.judges import JUDGES, get_judge

    if args.judge == "list":
        needs = {"probe": " Needs --model MODEL --probe PROBE_DIR.", "classifier": " Needs --classifier FOLDER.",
                 "guard": " Needs --judge-model DIR."}
        for name, cls in JUDGES.items():
            first = (cls.__doc__ or "").strip().split("\n\n")[0]  # the docstring's first paragraph, whole
            print(f"{name:12s} {' '.join(first.replace('``', '').split())}{needs.get(name, '')}")
        return 0
    if not args.input or not args.out:
        raise MechcliffError("mechcliff judge needs --input FILE and --out FILE (or --judge list)")
    if args.judge not in JUDGES:
        raise MechcliffError(f"unknown judge {args.judge!r}; available judges: {', '.join(JUDGES)}")
    if args.judge == "probe":
        if not (args.model and args.probe):
            raise MechcliffError("--judge probe needs --model MODEL and --probe PROBE_DIR")
        from mechcliff.asr import probe_judge
        from mechcliff.model.loading import load_model
        from mechcliff.probe import LinearProbe

        handle = load_model(args.model)
        judge = probe_judge(handle, LinearProbe.load(args.probe, handle))
    elif args.judge == "classifier":
        judge = get_judge("classifier", path=args.classifier)
    elif args.judge == "guard":
        judge = get_judge("guard", path=args.judge_model, fmt=args.guard_format)
    else:
        judge = get_judge(args.judge)
    from mechcliff.judging import judge_file

    s = judge_file(args.input, args.out, judge, progress=not args.no_progress)
    note = f" ({s.resumed} already judged)" if s.resumed else ""
    print(f"{s.n} verdicts{note}: {s.n_refused} refused ({fmt(s.refusal_rate)}) by '{s.judge}'; written to {s.out}")
    return 0


def cmd_agree(args: argparse.Namespace) -> int:
    import json

    from mechcliff.judging import agreement

    a = agreement(args.verdicts_a, args.verdicts_b)
    if args.json:
        print(json.dumps(a.to_dict()))
    else:
        print(f"{a.n} records: agreement {a.agreement:.3f}, Cohen's kappa {fmt(a.cohen_kappa, 3)}")
        print(f"both refused {a.both_refused}, both complied {a.both_complied}, only {a.judge_a} refused "
              f"{a.only_a_refused}, only {a.judge_b} refused {a.only_b_refused}")
    return 0


COMMANDS: dict[str, Handler] = {"judge": cmd_judge, "agree": cmd_agree}
