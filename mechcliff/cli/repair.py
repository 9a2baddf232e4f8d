"""Cliff-as-a-Judge: ``mechcliff select`` (safety-training examples from a candidate pool), ``mechcliff repair``
(fine-tune on a selection) and ``mechcliff repair-curve`` (ASR after repair vs the share of safety data, per method).

The logic lives in :mod:`mechcliff.selection`, :mod:`mechcliff.repair` and :mod:`mechcliff.repair_curve`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mechcliff.cli.common import Handler
from mechcliff.errors import MechcliffError
from mechcliff.model.presets import preset


def add_parsers(sub: Any) -> None:
    """Add ``select``, ``repair`` and ``repair-curve`` to ``sub`` (the ``add_subparsers`` object of the parser)."""
    se = sub.add_parser(
        "select", help="Cliff-as-a-Judge: select safety-training examples from a candidate pool (no model needed)",
        description="Rank the candidates of POOL (a run folder of 'mechcliff run', a repair-curve folder, or a "
        "scored pool JSONL) by METHOD and keep a budget of them; writes the Selection to --out and the selected "
        "rollouts to OUT/selected.jsonl.")
    se.add_argument("pool", help="run folder, repair-curve folder, or scored pool .jsonl")
    se.add_argument("--method", default="cliff", help="cliff (largest MS, default), final_score (lowest final "
                    "refusal score, the authors' code), rule (refusal keywords in the thinking), random, all")
    se.add_argument("--fraction", type=float, default=None, help="budget as a fraction of the pool, in (0, 1]")
    se.add_argument("--n", type=int, default=None, help="budget as a number of examples")
    se.add_argument("--plateau", default="mean", help="plateau of MS = plateau - final: mean (default) or max over the thinking")
    se.add_argument("--stratify", action="store_true", help="spread the budget over categories by their size")
    se.add_argument("--dedupe", action="store_true", help="drop repeated prompts, keeping the best-ranked copy")
    se.add_argument("--seed", type=int, default=0, help="seed for random / rule ordering")
    se.add_argument("--out", required=True, help="folder to write the selection to")
    rp = sub.add_parser(
        "repair", help="fine-tune (LoRA) on a selection: own thinking + a refusal, mixed with harmless examples",
        description="Fine-tune a fresh copy of MODEL on the selected candidates of POOL (targets: the model's own "
        "thinking, then a refusal), mixed with the harmless rollouts of --harmless (default: POOL's own). Writes "
        "OUT/adapter (load with load_model(MODEL, adapter=OUT)), OUT/checkpoints and OUT/training.")
    rp.add_argument("--model", required=True, help="the model the pool was rolled out with")
    rp.add_argument("--pool", required=True, help="run folder, repair-curve folder, or scored pool .jsonl")
    rp.add_argument("--selection", required=True, help="a folder written by 'mechcliff select' from the same pool")
    rp.add_argument("--harmless", default=None, help="harmless rollouts .jsonl for the mix (default: the pool "
                    "folder's rollouts/harmless.jsonl or rollouts/mix.jsonl)")
    rp.add_argument("--refusal", default=None, help="refusal answer to train on (default: the model's most common refusal in the pool)")
    rp.add_argument("--method", default="lora", help="lora (default) or full")
    rp.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-2 organism, 1e-4 other models)")
    rp.add_argument("--epochs", type=float, default=3.0, help="passes over the training mix (default 3)")
    rp.add_argument("--min-steps", type=int, default=30, help="at least this many optimizer steps (default 30)")
    rp.add_argument("--checkpoint-every", type=int, default=0, help="save the adapter every N steps too")
    rp.add_argument("--seed", type=int, default=0, help="seed for the training mix order and initialisation")
    rp.add_argument("--out", required=True, help="folder to write the adapter, checkpoints and training record to")
    rp.add_argument("--no-progress", action="store_true", help="hide progress bars")
    rc = sub.add_parser(
        "repair-curve", help="the Cliff-as-a-Judge experiment: ASR after repair vs %% of safety data, per method",
        description="Select → fine-tune → evaluate at several budgets for each selection method; writes "
        "DIR/curve.json, DIR/points.csv, DIR/figures/repair_curve.json, DIR/report.html. Resumable.")
    rc.add_argument("--model", default=None, help="model spec, as for 'run --model' (default: organism)")
    rc.add_argument("--out", required=True, help="folder to write (resumed if present)")
    rc.add_argument("--config", default=None, help="JSON or TOML file of RepairCurveConfig options")
    rc.add_argument("--methods", default=None, help="comma-separated: cliff,random,final_score,rule,all")
    rc.add_argument("--fractions", default=None, help="comma-separated budgets in (0, 1], e.g. 0.05,0.1,0.25")
    rc.add_argument("--seeds", type=int, default=None, help="training seeds per point (random: selection seeds too)")
    rc.add_argument("--no-progress", action="store_true", help="hide progress bars")


def cmd_select(args: argparse.Namespace) -> int:
    from mechcliff.data import save_rollouts
    from mechcliff.repair_curve import load_pool_or_run
    from mechcliff.selection import select

    pool = load_pool_or_run(args.pool)
    sel = select(pool, args.method, fraction=None if args.method == "all" else args.fraction,
                 n=None if args.method == "all" else args.n, plateau=args.plateau, stratify=args.stratify,
                 dedupe=args.dedupe, seed=args.seed)
    out = sel.save(args.out)
    save_rollouts(sel.rollouts(pool), Path(out) / "selected.jsonl")
    groups = [r.group for r in sel.rollouts(pool)]
    mix = ", ".join(f"{g} {groups.count(g)}" for g in sorted(set(groups), key=str))
    print(f"selected {len(sel)} of {len(pool)} candidates by '{args.method}' ({mix})")
    print(f"selection: {out}")
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    from mechcliff.data import load_rollouts
    from mechcliff.model.loading import load_model
    from mechcliff.repair import FinetuneConfig, build_examples, finetune, refusal_answer
    from mechcliff.repair_curve import load_pool_or_run
    from mechcliff.selection import Selection

    pool = load_pool_or_run(args.pool)
    if not Path(args.selection).is_dir():
        raise MechcliffError(f"selection folder not found: {args.selection}")
    sel = Selection.load(args.selection)
    selected = sel.rollouts(pool)  # raises when the selection was made from another pool
    harmless_path = Path(args.harmless) if args.harmless else next(
        (Path(args.pool) / "rollouts" / f for f in ("harmless.jsonl", "mix.jsonl")
         if (Path(args.pool) / "rollouts" / f).exists()), None)
    if harmless_path is None:
        raise MechcliffError("no harmless rollouts for the training mix: pass --harmless FILE.jsonl")
    harmless = load_rollouts(harmless_path)
    refusal = args.refusal or refusal_answer(pool.rollouts)
    examples = build_examples(selected, harmless, refusal=refusal, seed=args.seed)
    lr = args.lr if args.lr is not None else preset(args.model).repair_lr
    cfg = FinetuneConfig(method=args.method, lr=lr, epochs=args.epochs, min_steps=args.min_steps,
                         checkpoint_every=args.checkpoint_every, seed=args.seed)
    handle = load_model(args.model)
    res = finetune(handle, examples, args.out, cfg, progress=not args.no_progress)
    print(f"fine-tuned on {res.n_safety} safety + {res.n_mix} harmless examples, {len(res.losses)} steps: "
          f"loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f} ({res.seconds:.0f} s)")
    print(f"adapter: {res.adapter_dir}  (load_model({args.model!r}, adapter={args.out!r}))")
    return 0


def cmd_repair_curve(args: argparse.Namespace) -> int:
    from mechcliff.repair_curve import RepairCurveConfig, repair_curve

    overrides: dict[str, object] = {"model": args.model, "seeds": args.seeds}
    if args.methods:
        overrides["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.fractions:
        try:
            overrides["fractions"] = [float(f) for f in args.fractions.split(",") if f.strip()]
        except ValueError:
            raise MechcliffError(f"--fractions must be comma-separated numbers, got {args.fractions!r}") from None
    if args.config:
        cfg = RepairCurveConfig.from_file(args.config, **overrides)
    else:
        cfg = RepairCurveConfig.from_dict({k: v for k, v in overrides.items() if v is not None}, source="command line")
    curve = repair_curve(cfg.model, args.out, config=cfg, progress=not args.no_progress)
    for key, value in curve.summary_rows():
        print(f"{key}: {value}")
    out = Path(args.out)
    print(f"curve:  {out / 'curve.json'}")
    print(f"report: {(out / 'report.html').resolve()}")
    return 0


COMMANDS: dict[str, Handler] = {"select": cmd_select, "repair": cmd_repair, "repair-curve": cmd_repair_curve}
