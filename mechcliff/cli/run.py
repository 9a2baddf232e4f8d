"""``mechcliff run``: the whole refusal-cliff pipeline (rollouts, probe, trace, attribution, ablation, report).

The logic lives in :mod:`mechcliff.pipeline` (:func:`~mechcliff.pipeline.run_pipeline`); this module turns the flags
into a :class:`~mechcliff.pipeline.RunConfig` and prints the headline numbers and where the results are.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mechcliff.cli.common import PLACEMENT_FLAGS, Handler
from mechcliff.errors import MechcliffError
from mechcliff.fmt import fmt


def _probe_layer(text: str) -> int | str:
    return text if text == "best" else int(text)


# `mechcliff run` flags for the common RunConfig options: flag -> (field, type, help).
RUN_FLAGS = {
    "--max-think-tokens": ("max_think_tokens", int, "thinking budget per rollout, in tokens (0: an empty, closed "
                           "thinking). Default: 4096 on real models (reasoning-scale: a shorter budget force-closes "
                           "the thinking), 32 with --quick, 48 on the organisms"),
    "--max-answer-tokens": ("max_answer_tokens", int, "answer budget per rollout, in tokens. Default: 512 on real "
                            "models, 24 with --quick, 32 on the organisms"),
    "--temperature": ("temperature", float, "sampling temperature (0: greedy, the default; arXiv 2510.06036: 0.7)"),
    "--top-p": ("top_p", float, "nucleus sampling: keep the most likely tokens up to this probability mass "
                "(1: all, the default)"),
    "--samples": ("n_samples", int, "rollouts per prompt (default 1; > 1 needs --temperature > 0), each seeded "
                  "from --seed, the prompt and the sample, independent of batching; the ASR is over all samples, "
                  "with per-prompt Wilson intervals"),
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
    **PLACEMENT_FLAGS,  # --device, --dtype, --device-map
}


def _group_file(text: str) -> tuple[str, str]:
    """``GROUP=FILE`` of ``--rollouts``."""
    group, sep, path = text.partition("=")
    if not sep or not group.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected GROUP=FILE (e.g. harmful=RUN/rollouts/harmful.jsonl), got {text!r}")
    return group.strip(), path


def _group_source(text: str) -> tuple[str, str]:
    """``GROUP=SOURCE`` of ``--prompts``."""
    group, sep, src = text.partition("=")
    if not sep or not group.strip() or not src.strip():
        raise argparse.ArgumentTypeError(f"expected GROUP=SOURCE (e.g. harmless=prompts.json or harmless=builtin), "
                                         f"got {text!r}")
    return group.strip(), src


def _prompt_sources(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """``--prompts GROUP=SOURCE`` -> the ``prompts`` option: ``builtin`` is the built-in set of GROUP (``""``), a
    registered source (``heldout:NAME``) stays as it is, a file becomes an absolute path."""
    from mechcliff.data import prompt_source_schemes

    out = {}
    for g, src in pairs:
        scheme, sep, _ = src.partition(":")
        if src == "builtin" and not Path(src).exists():
            out[g] = ""
        elif sep and scheme in prompt_source_schemes():
            out[g] = src
        else:
            out[g] = str(Path(src).resolve())
    return out


def add_parsers(sub: Any) -> None:
    """Add ``run`` to ``sub`` (the ``add_subparsers`` object of the ``mechcliff`` parser)."""
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
    r.add_argument("--quick", action="store_true", help="a quick run: 40 prompts per group, 32 thinking + 24 answer tokens, 2 random-head sets on real models (a smoke test: such budgets cut real reasoning short)")
    r.add_argument("--seed", type=int, default=None, help="seed for generation, probe split and random heads")
    r.add_argument("--n-per-group", type=int, default=None, help="use at most this many prompts per group")
    for flag, (field, kind, text) in RUN_FLAGS.items():
        r.add_argument(flag, dest=field, type=kind, default=None, help=text)
    r.add_argument("--rollouts", dest="rollouts", type=_group_file, action="append", default=None, metavar="GROUP=FILE",
                   help="use these rollouts (mechcliff's JSONL, e.g. written by 'mechcliff import-rollouts') for GROUP "
                   "instead of generating it; repeatable")
    r.add_argument("--prompts", dest="prompts", type=_group_source, action="append", default=None, metavar="GROUP=SOURCE",
                   help="generate GROUP from SOURCE: a prompt file (JSON list of {instruction}, CSV, JSONL, one per "
                   "line), 'builtin' (the built-in set of GROUP) or 'heldout:NAME'; repeatable; replaces the config's "
                   "prompts (e.g. --rollouts harmful=RUN/rollouts/harmful.jsonl --prompts harmless=FILE)")
    r.add_argument("--print-config", action="store_true",
                   help="print the configuration the run would use (the model's defaults, then --config, then these "
                   "flags) as JSON, and exit")
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")
    r.add_argument("--overwrite", action="store_true",
                   help="the --out folder holds a run with another configuration: recompute the stages that depend "
                   "on what changed, replacing their results (without it such a folder is refused)")


def cmd_run(args: argparse.Namespace) -> int:
    import json

    from mechcliff.pipeline import RunConfig, default_config, run_pipeline

    overrides = {"model": args.model, "adapter": args.adapter, "seed": args.seed, "n_per_group": args.n_per_group,
                 "quick": True if args.quick else None, "rollouts": {g: str(Path(f).resolve()) for g, f in args.rollouts} if args.rollouts else None,
                 "prompts": _prompt_sources(args.prompts) if args.prompts else None,
                 **{field: getattr(args, field) for field, _, _ in RUN_FLAGS.values()}}
    flags = {"seed": "--seed", "n_per_group": "--n-per-group", "model": "--model", "adapter": "--adapter",
             "rollouts": "--rollouts", "prompts": "--prompts",
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


COMMANDS: dict[str, Handler] = {"run": cmd_run}
