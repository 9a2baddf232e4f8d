"""Commands that take a finished run folder further: ``patch`` (causal confirmation by activation patching),
``sweep`` (ablation sweeps over k × γ × mode) and ``ships`` (Ships head importance and the Sahara group search).

Each reads the run's manifest for the model and its settings, the run's rollouts, probe and attribution, writes
its saved result (re-plottable with ``mechcliff plot DIR``), a self-contained HTML page and ``summary.json`` to
``--out DIR``, and prints where. The logic lives in :mod:`mechcliff.patching`, :mod:`mechcliff.sweep` and
:mod:`mechcliff.ships`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mechcliff.cli.common import Handler, done, load, log, numbers, write_result, write_summary
from mechcliff.errors import MechcliffError

if TYPE_CHECKING:
    from mechcliff.model.handle import ModelHandle


def add_parsers(sub: Any) -> None:
    """Add ``patch``, ``sweep`` and ``ships`` to ``sub`` (the ``add_subparsers`` object of the ``mechcliff`` parser)."""
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("run_dir", help="a finished run folder of 'mechcliff run' (its model, rollouts, probe, attribution)")
        p.add_argument("--out", required=True, help="folder to write the result, its HTML page and summary.json to")
        p.add_argument("--n-per-group", type=int, default=None, help="use at most N rollouts per group")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = sub.add_parser("patch", help="activation patching of every head between two groups of a run (causal check)",
                       description="Patch each head's output z at the run's probe position from the --source group's "
                       "rollout into the --target group's, pair by pair (rollout i with rollout i), and measure the "
                       "probe logit (or the refusal log-odds). Writes OUT/head_patching/, OUT/head_patching.html, "
                       "OUT/summary.json.")
    common(p)
    p.add_argument("--source", default="harmful", help="group whose activations are patched in (default harmful: refused)")
    p.add_argument("--target", default="harmful_jailbreak", help="group patched into (default harmful_jailbreak)")
    p.add_argument("--metric", default="probe", choices=("probe", "refusal_log_odds"),
                   help="probe: the run's probe logit (default); refusal_log_odds: log-odds of the refused answers' "
                   "first tokens (Arditi et al.)")
    p.add_argument("--memory-mb", type=float, default=2048.0, help="memory budget of one forward pass (default 2048)")
    s = sub.add_parser("sweep", help="ablation sweep of a run's top heads: k × γ × mode, random controls, capability",
                       description="Ablate the top-k heads of the run's attribution over a grid of k, γ and mode, with "
                       "random head sets of the same size; ASR on the run's attack prompts, harmless refusal, loss and "
                       "KL. Resumable (OUT/cells.jsonl). Writes OUT/ablation_sweep/, OUT/ablation_sweep.html, "
                       "OUT/summary.json.")
    common(s)
    s.add_argument("--ks", default="1,2,4,8", help="numbers of heads, comma-separated (default 1,2,4,8)")
    s.add_argument("--gammas", default="0", help="γ values for scale_z / scale_q / norm_preserving (default 0)")
    s.add_argument("--modes", default="scale_z", help="modes, comma-separated: scale_z, zero, scale_q, norm_preserving")
    s.add_argument("--sign", default="neg", choices=("neg", "pos"),
                   help="neg: refusal-suppression heads (most negative attribution; removing them restores refusal), "
                   "pos: refusal-promoting heads (most positive)")
    s.add_argument("--n-random", type=int, default=3, help="random head sets per k (default 3)")
    s.add_argument("--attack", default=None, help="attack group (default: harmful_jailbreak, else harmful)")
    h = sub.add_parser("ships", help="Ships head importance on a run's rollouts (and the Sahara group search)",
                       description="Ships (arXiv 2410.13708): the KL of the next-token distribution with and without "
                       "each head, on a group's rollouts. Writes OUT/head_importance/, OUT/head_importance.html, "
                       "OUT/summary.json (and OUT/sahara/ with --sahara).")
    common(h)
    h.add_argument("--group", default="harmful", help="group whose rollouts are scored (default harmful)")
    h.add_argument("--mode", default="scale_q", choices=("scale_q", "scale_z"),
                   help="scale_q: undifferentiated attention (the paper's, default); scale_z: zero the head's output")
    h.add_argument("--position", default="last", help="token the KL is read at (default last; e.g. think_end)")
    h.add_argument("--sahara", type=int, default=0, help="also run the greedy Sahara group search for this many steps")


# --------------------------------------------------------------------------- the run folder

class RunFolder:
    """A finished ``mechcliff run`` folder: its config, rollouts, probe and attribution, and its model."""

    def __init__(self, path: str | Path):
        from mechcliff.pipeline import RunConfig

        self.dir = Path(path)
        manifest = self.dir / "manifest.json"
        if not manifest.is_file():
            raise MechcliffError(f"{self.dir} is not a run folder of 'mechcliff run' (no manifest.json)")
        try:
            doc = json.loads(manifest.read_text())
        except ValueError as exc:
            raise MechcliffError(f"cannot read {manifest}: {exc}") from None
        if not isinstance(doc, dict) or "mechcliff_run" not in doc:
            raise MechcliffError(f"{manifest} is not the manifest of a 'mechcliff run' folder")
        if doc.get("status") not in ("finished", "complete"):
            raise MechcliffError(f"{self.dir} is not a finished run (status {doc.get('status')!r}); finish it with "
                                 "the same `mechcliff run` command first")
        self.cfg = RunConfig.from_dict(doc["config"], source=str(manifest))
        self.handle: ModelHandle | None = None

    def rollouts(self, group: str) -> list:
        from mechcliff.data import load_rollouts

        path = self.dir / "rollouts" / f"{group}.jsonl"
        if not path.exists():
            have = sorted(p.stem for p in (self.dir / "rollouts").glob("*.jsonl"))
            raise MechcliffError(f"{self.dir} has no '{group}' rollouts; its groups: {', '.join(have)}")
        return load_rollouts(path)

    def model(self) -> Any:
        if self.handle is None:
            self.handle = load(self.cfg.model, seed=self.cfg.seed, adapter=self.cfg.adapter,
                               think=self.cfg.think_format)
        return self.handle

    def probe(self) -> Any:
        from mechcliff.probe import LinearProbe

        return LinearProbe.load(self.dir / "probe", self.model())

    def attribution(self) -> Any:
        from mechcliff.results import Result

        return Result.load(self.dir / "attribution")


def _outputs(out: Path, name: str, result: Any, title: str, notes: list[str],
             summary: dict[str, Any]) -> list[tuple[str, Path]]:
    """Save ``result``, its page (one figure, ``result.plot()``) and ``summary.json``; ``(label, path)`` of each."""
    rdir, html = write_result(out, name, result, title, [(title, result.plot())], notes)
    return [("result", rdir), ("report", html), ("summary", write_summary(out, summary))]


# --------------------------------------------------------------------------- patch

def cmd_patch(args: argparse.Namespace) -> int:
    """Patch each head's output from the source group's runs into the target group's, pair by pair."""
    from mechcliff.generation import encode_rollouts
    from mechcliff.patching import ProbeMetric, RefusalLogOddsMetric, patch_heads

    t0 = time.time()
    run = RunFolder(args.run_dir)
    source, target = run.rollouts(args.source), run.rollouts(args.target)
    n = min(len(source), len(target), args.n_per_group or len(source))
    if n < 1:
        raise MechcliffError("no pairs to patch")
    source, target = source[:n], target[:n]
    h = run.model()
    if args.metric == "probe":
        metric: Any = ProbeMetric(run.probe())
    else:
        refused = [r for r in source if r.meta.get("refused")]
        if not refused:
            raise MechcliffError(f"metric 'refusal_log_odds' takes its refusal tokens from the refused '{args.source}' "
                                 "answers, and there are none; use --metric probe")
        ids = {h.tokenizer(r.response, add_special_tokens=False)["input_ids"][0] for r in refused if r.response}
        metric = RefusalLogOddsMetric(sorted(ids))
    pos = run.cfg.position
    log(f"[patch] {n} pairs '{args.source}' -> '{args.target}', metric {metric.name}, at {pos}")
    res = patch_heads(h, encode_rollouts(h, target, enable_thinking=run.cfg.enable_thinking),
                      encode_rollouts(h, source, enable_thinking=run.cfg.enable_thinking), metric,
                      target_position=pos, source_position=pos, memory_budget_mb=args.memory_mb,
                      progress=not args.no_progress)
    top = res.top(10)
    summary = {"run": str(run.dir), "source": args.source, "target": args.target, "pairs": n, "metric": metric.name,
               "position": pos, "target_mean": float(res.target.mean()), "source_mean": float(res.source.mean()),
               "top_heads": top}
    notes = [f"Each head's z at {pos} is patched from the '{args.source}' run of the pair into the "
             f"'{args.target}' run; normalised effect (patched − target) / (source − target) on example means."]
    print(f"top heads by normalised effect: {', '.join(top[:5])}")
    return done(_outputs(Path(args.out), "head_patching", res, "Activation patching of heads", notes, summary), t0)


# --------------------------------------------------------------------------- sweep

def cmd_sweep(args: argparse.Namespace) -> int:
    """Ablate the top-k heads by attribution over a k × γ × mode grid, with random same-size controls."""
    from mechcliff.judges import get_judge
    from mechcliff.pipeline import ATTACK_GROUPS
    from mechcliff.sweep import ablation_sweep

    t0 = time.time()
    run = RunFolder(args.run_dir)
    ks = numbers(args.ks, int, "--ks")
    gammas = numbers(args.gammas, float, "--gammas")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    dpa = run.attribution()
    ranked = dpa.top(max(ks), sign=args.sign)
    attack_group = args.attack or next(g for g in ATTACK_GROUPS if (run.dir / "rollouts" / f"{g}.jsonl").exists())
    attack, harmless = run.rollouts(attack_group), run.rollouts("harmless")
    if args.n_per_group:
        attack, harmless = attack[: args.n_per_group], harmless[: args.n_per_group]
    from mechcliff.data import Prompt

    def prompts(rolls: list) -> list:
        return [Prompt(text=r.prompt, category=r.category, group=r.group, id=r.id) for r in rolls]

    out = Path(args.out)
    log(f"[sweep] {len(attack)} '{attack_group}' and {len(harmless)} harmless prompts; k {ks}, γ {gammas}, "
         f"modes {modes}, {args.n_random} random sets")
    res = ablation_sweep(run.model(), ranked, prompts(attack), prompts(harmless), judge=get_judge("refusal"), ks=ks,
                         gammas=gammas, modes=modes, n_random=args.n_random, seed=run.cfg.seed,
                         harmless_rollouts=harmless, out_dir=out, generation=run.cfg.generation(False),
                         progress=not args.no_progress)
    summary = {"run": str(run.dir), "attack_group": attack_group, "ranked_heads": ranked, "baseline": res.baseline,
               "cells": res.cells}
    notes = ["ASR on the run's attack prompts with the top-k heads by direct probe attribution ablated (ranked), "
             "and with random head sets of the same size; capability: loss on the harmless continuations and "
             "next-token KL. Cells are kept in OUT/cells.jsonl: a re-run resumes."]
    best = min((c for c in res.cells if c["selection"] == "ranked"), key=lambda c: c["asr"])
    print(f"baseline ASR {res.baseline['asr']:.2f}; lowest ranked-head ASR {best['asr']:.2f} "
          f"({best['mode']} γ={best['gamma']:g}, k={best['k']})")
    return done(_outputs(out, "ablation_sweep", res, "Ablation sweep", notes, summary), t0)


# --------------------------------------------------------------------------- ships

def cmd_ships(args: argparse.Namespace) -> int:
    """Ships head importance (per-query KL with and without each head) on a group's rollouts; Sahara on request."""
    from mechcliff.generation import encode_rollouts
    from mechcliff.ships import sahara, ships_scores

    t0 = time.time()
    run = RunFolder(args.run_dir)
    rolls = run.rollouts(args.group)[: args.n_per_group or None]
    h = run.model()
    batch = encode_rollouts(h, rolls, enable_thinking=run.cfg.enable_thinking)
    log(f"[ships] {len(rolls)} '{args.group}' rollouts, {args.mode} at {args.position}")
    res = ships_scores(h, batch, mode=args.mode, position=args.position)
    out = Path(args.out)
    summary: dict[str, Any] = {"run": str(run.dir), "group": args.group, "mode": args.mode, "position": args.position,
                               "n": len(rolls), "top_heads": res.top(10)}
    paths = _outputs(out, "head_importance", res, "Ships head importance",
                     [f"KL of the next-token distribution at {args.position} with each head ablated ({args.mode})."],
                     summary)
    print(f"most important heads (Ships): {', '.join(res.top(5))}")
    if args.sahara:
        log(f"[sahara] greedy search of {args.sahara} steps")
        group = sahara(h, batch, steps=args.sahara, mode=args.mode, position=args.position,
                       progress=not args.no_progress)
        summary["sahara_heads"] = group.heads
        paths += _outputs(out, "sahara", group, "Sahara head group", ["Greedy search for the head group (Sahara)."],
                          summary)[:2]
        print(f"Sahara group: {', '.join(group.heads)}")
    return done(paths, t0)


COMMANDS: dict[str, Handler] = {"patch": cmd_patch, "sweep": cmd_sweep, "ships": cmd_ships}
