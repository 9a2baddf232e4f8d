"""Commands for "When Thinking Backfires" (arXiv 2509.00544): ``compare-modes``, ``refusal-heads``, ``neurons``, ``ras``.

Each command writes its saved result(s) (JSON + safetensors, re-plottable with ``mechcliff plot DIR``), a
self-contained HTML page per figure, and ``summary.json`` to ``--out DIR``, and prints where. The logic lives in
:mod:`mechcliff.modes`, :mod:`mechcliff.refusal_heads` and :mod:`mechcliff.neurons`.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from mechcliff.cli.common import Handler, add_model_flag, done, load, log, write_result, write_summary
from mechcliff.errors import MechcliffError


def _common(p: argparse.ArgumentParser, *, model: bool = True, harmless: bool = True) -> None:
    if model:
        add_model_flag(p)
    p.add_argument("--out", required=True, help="folder to write the results to (created if missing)")
    p.add_argument("--n-per-group", "--n", dest="n", type=int, default=None,
                   help="use at most N prompts per group (--n is the older spelling)")
    p.add_argument("--harmful", default=None, help="harmful prompt file (JSON / JSONL / CSV / TXT; default: the "
                   "built-in set)")
    if harmless:
        p.add_argument("--harmless", default=None, help="harmless prompt file (default: the built-in set)")
    p.add_argument("--max-think-tokens", type=int, default=None,
                   help="thinking budget per rollout, in tokens (default: 4096 on real models, 48 on the organisms)")
    p.add_argument("--max-answer-tokens", type=int, default=None,
                   help="answer budget per rollout, in tokens (default: 512 on real models, 32 on the organisms)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass and generation batch (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed for generation and random controls (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_parsers(sub: Any) -> None:
    """Add the subcommands to ``sub`` (the ``add_subparsers`` object of the ``mechcliff`` parser)."""
    c = sub.add_parser(
        "compare-modes", help="thinking on vs off on the same prompts: ASR, refusal trace and cliff per mode",
        description="Generate with thinking enabled and disabled on the same prompts; report per mode the refusal "
        "rate and ASR (Wilson intervals), the refusal trace and cliff statistics with one probe (MS is undefined "
        "without thinking), and a side-by-side figure. Writes DIR/mode_comparison/, DIR/mode_comparison.html, "
        "DIR/trace_thinking/, DIR/trace_no_thinking/, DIR/rollouts/*.jsonl, DIR/probe/ (when fitted), DIR/summary.json.")
    _common(c)
    c.add_argument("--probe", default=None, help="a saved probe folder of this model (default: fit one on the "
                   "thinking-on rollouts)")
    c.add_argument("--no-think-format", default="template", choices=("template", "empty_block", "omit"),
                   help="thinking off: the chat template's enable_thinking=False (default; needs a template with a "
                   "thinking switch), an empty think block written by mechcliff, or no block")
    c.add_argument("--label-source", default="auto", choices=("auto", "behaviour", "dataset"),
                   help="labels of the probe fitted when --probe is not given (default auto)")

    r = sub.add_parser(
        "refusal-heads", help="refusal heads whose first-answer-token attention argmax moves between modes",
        description="For every head, the key with the largest attention from the first answer token with thinking "
        "on and off; heads whose argmax moves from the 'assistant' token to the span between the think tags, with "
        "their frequency over prompts; ablation of the detected heads vs random heads per layer, read by the refusal "
        "probe at the between-think-tags token. Writes DIR/refusal_heads/, DIR/refusal_heads.html, DIR/summary.json.")
    _common(r)
    r.add_argument("--probe", default=None, help="a saved probe folder of this model (default: fit one on "
                   "thinking-off rollouts at the between-think-tags token)")
    r.add_argument("--no-think-format", default="template", choices=("template", "empty_block"),
                   help="how thinking is switched off: the chat template's switch, or an empty think block")
    r.add_argument("--query", default="first_answer", choices=("first_answer", "think_end"),
                   help="the attention row read: the first answer token (default) or the last template token")
    r.add_argument("--min-frequency", type=float, default=0.4, help="detected heads: shift frequency >= this")
    r.add_argument("--top-k", type=int, default=None, help="detected heads: the K most frequent instead (among heads "
                   "that shift at least once)")
    r.add_argument("--n-random", type=int, default=3, help="random per-layer head sets for the control")

    n = sub.add_parser(
        "neurons", help="safety-critical MLP neurons (counterfactual pairs) and their zero-ablation vs random",
        description="Intersection of the top-m max-pooled MLP activation differences over counterfactual pairs "
        "(harmful prompt vs the same prompt with a malicious-intent sentence appended), then zero-ablation of those "
        "neurons vs random neurons of the same count: misalignment rate, harmless refusal, capability. Writes "
        "DIR/critical_neurons/, DIR/neuron_ablation/, their .html figures and DIR/summary.json.")
    _common(n)
    n.add_argument("--m", type=int, default=None, help="top neurons per pair (default: 5%% of all MLP neurons; "
                   "the paper does not state m)")
    n.add_argument("--quorum", type=float, default=1.0, help="keep neurons in the top m of at least this share of "
                   "the pairs (1 = the paper's intersection)")
    n.add_argument("--span", default="all", choices=("all", "continuation"), help="tokens max-pooled over")
    n.add_argument("--n-random", type=int, default=3, help="random neuron sets of the same size, as the control")
    n.add_argument("--match-layers", action="store_true", help="random neurons matched per layer")

    s = sub.add_parser(
        "ras", help="Reciprocal Activation Shift between a base model and fine-tuned checkpoints",
        description="RAS (harmonic mean of the reciprocal activation shifts on safety and reasoning inputs) on the "
        "safety-critical neurons and on random neurons, for each checkpoint (adapter folders written by fine-tuning "
        "or model folders), correlated with each checkpoint's change in misalignment rate. Writes DIR/ras_series/, "
        "DIR/ras_series.html, DIR/critical_neurons/ (when identified here) and DIR/summary.json.")
    s.add_argument("--base", required=True, help="the base model spec (as for --model)")
    s.add_argument("--finetuned", nargs="+", required=True, metavar="FOLDER",
                   help="one or more checkpoints: adapter folders (fine-tuning output, adapter/, checkpoints/step-N) "
                   "or Hugging Face model folders")
    _common(s, model=False, harmless=False)
    s.add_argument("--neurons", default=None, help="a saved critical_neurons folder (default: identify them on "
                   "the base model with --m / --quorum)")
    s.add_argument("--m", type=int, default=None, help="top neurons per pair when identifying them (as for 'neurons')")
    s.add_argument("--quorum", type=float, default=1.0, help="share of pairs a neuron must be top-m in (as for 'neurons')")
    s.add_argument("--reasoning", default=None, help="reasoning prompt file (default: a built-in set of "
                   "arithmetic word problems)")
    s.add_argument("--n-random", type=int, default=3, help="random neuron sets of the same size, as the control")
    s.add_argument("--invalid", default="skip", choices=("skip", "abs"),
                   help="RAS terms whose activations differ in sign: skip (default) or use magnitudes")


# --------------------------------------------------------------------------- helpers


def _prompts(path: str | None, groups: tuple[str, ...], n: int | None, group: str) -> list:
    import mechcliff.learned_organism  # noqa: F401 - registers the 'heldout:' prompt sources
    from mechcliff.data import builtin_prompts, prompt_source

    if n is not None and n < 1:
        raise MechcliffError(f"--n must be at least 1, got {n}")
    if path:
        return prompt_source(path, group=group, limit=n)
    out = []
    for g in groups:
        out += builtin_prompts(g)[:n] if n else builtin_prompts(g)
    return out


def _gen(args: argparse.Namespace) -> dict[str, Any]:
    for name in ("max_think_tokens", "max_answer_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise MechcliffError(f"--{name.replace('_', '-')} must be >= 0")
    if args.batch_size < 1:
        raise MechcliffError("--batch-size must be at least 1")
    return dict(max_think_tokens=args.max_think_tokens, max_answer_tokens=args.max_answer_tokens,
                batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress)


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and v != v) else f"{v:.2f}"


# --------------------------------------------------------------------------- commands


def _probe_inputs(args: argparse.Namespace) -> tuple[list[Any], list[Any], Any, Any]:
    """The harmful prompts (plain and jailbreak), the harmless prompts, the model, and the ``--probe`` (or None)."""
    from mechcliff.probe import LinearProbe

    harmful = _prompts(args.harmful, ("harmful", "harmful_jailbreak"), args.n, "harmful")
    harmless = _prompts(args.harmless, ("harmless",), args.n, "harmless")
    h = load(args.model)
    return harmful, harmless, h, (LinearProbe.load(args.probe, h) if args.probe else None)


def cmd_compare_modes(args: argparse.Namespace) -> int:
    from mechcliff.data import save_rollouts
    from mechcliff.modes import MODES, compare_modes

    t0 = time.time()
    out = Path(args.out)
    harmful, harmless, h, probe = _probe_inputs(args)
    res = compare_modes(h, harmful, harmless, probe, no_think_format=args.no_think_format,
                        label_source=args.label_source, log=log, **_gen(args))
    traces, rollouts = res.traces, res.rollouts
    assert traces is not None and rollouts is not None  # compare_modes fills both (None only in a bare instance)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    rdir, html = write_result(out, "mode_comparison", res, f"Thinking on vs off: {res.model_id}",
                              [("Thinking on vs off", res.plot()),
                               *[(f"Refusal trace, {m.replace('_', ' ')}", traces[m].plot()) for m in MODES]],
                              notes=["Refusal judged on the final answer by the refusal-phrase judge. MS is "
                                     "undefined without thinking (n/a). The thinking-off probe score is read at the "
                                     "last token before the answer."])
    paths += [("result", rdir), ("figure", html)]
    for m in MODES:
        paths.append((f"trace ({m})", traces[m].save(out / f"trace_{m}")))
        save_rollouts(rollouts[m], out / "rollouts" / f"{m}.jsonl")
    if res.probe_fitted:
        paths.append(("probe", res.probe.save(out / "probe")))
    summ = res.summary()
    paths.append(("summary", write_summary(out, {"command": "compare-modes", "model": res.model_id,
                                                 "no_think_format": res.no_think_format, "probe_layer": res.probe_layer,
                                                 "probe_label_source": res.probe_label_source, "modes": summ,
                                                 "seconds": round(time.time() - t0, 1)})))
    for m, groups in summ.items():
        for g, r in groups.items():
            asr = f" ASR {_fmt(r['asr']['rate'])} [{r['asr']['low']:.2f}, {r['asr']['high']:.2f}]" if "asr" in r else ""
            print(f"{m:12s} {g:18s} n={r['n']:3d} refusal {_fmt(r['refusal']['rate'])}{asr} "
                  f"final {_fmt(r['final'])} MS {_fmt(r['ms'])}")
    return done(paths, t0)


def cmd_refusal_heads(args: argparse.Namespace) -> int:
    from mechcliff.refusal_heads import refusal_heads

    t0 = time.time()
    out = Path(args.out)
    harmful, harmless, h, probe = _probe_inputs(args)
    gen = _gen(args)
    res = refusal_heads(h, harmful, harmless_prompts=harmless, probe=probe, no_think_format=args.no_think_format,
                        query=args.query, min_frequency=args.min_frequency, top_k=args.top_k,
                        n_random=args.n_random, log=log, **gen)
    out.mkdir(parents=True, exist_ok=True)
    figs = [("Shift frequency per head", res.plot())]
    if res.ablation:
        figs.append(("Ablation: refusal probe at the between-think-tags token", res.plot_ablation()))
    rdir, html = write_result(out, "refusal_heads", res, f"Refusal heads by attention shift: {res.model_id}", figs,
                              notes=["Shift: the first answer token's attention argmax is on the 'assistant' token with "
                                     "thinking on and between the think tags (or on them, when no token lies between) "
                                     "with thinking off."])
    ranked = res.ranked()
    doc: dict[str, Any] = {
        "command": "refusal-heads", "model": res.model_id, "n": int(res.valid.sum()), "query": res.query,
        "top_shift_frequencies": ranked[:20], "detected_heads": res.heads, "reference_heads": res.reference_heads,
        "ablation": {k: v for k, v in (res.ablation or {}).items() if k not in ("baseline", "targeted", "random")}
        or None,
        "seconds": round(time.time() - t0, 1)}
    if res.ablation:
        doc["ablation"].update(baseline=res.ablation["baseline"]["score"], targeted=res.ablation["targeted"]["score"],
                               random=[r["score"] for r in res.ablation["random"]])
    s = write_summary(out, doc)
    print("top shift frequencies: " + (", ".join(f"{hd} {v:.2f}" for hd, v in ranked[:8]) or "none"))
    print("detected heads: " + (", ".join(res.heads) or f"none (no head at frequency >= {res.min_frequency:g}; "
                                                         "try --top-k or --min-frequency)"))
    if res.reference_heads:
        print("planted heads (organism): " + ", ".join(res.reference_heads))
    if res.ablation:
        ab = res.ablation
        print(f"probe score at the between-tags token: no ablation {ab['baseline']['score']:.3f}, detected heads "
              f"{ab['targeted']['score']:.3f}, random per layer "
              + ", ".join(f"{r['score']:.3f}" for r in ab["random"]))
    return done([("result", rdir), ("figure", html), ("summary", s)], t0)


def cmd_neurons(args: argparse.Namespace) -> int:
    from mechcliff.neurons import critical_neurons, neuron_ablation

    t0 = time.time()
    out = Path(args.out)
    harmful = _prompts(args.harmful, ("harmful",), args.n, "harmful")
    harmless = _prompts(args.harmless, ("harmless",), args.n, "harmless")
    h = load(args.model)
    gen = _gen(args)
    cn = critical_neurons(h, harmful, m=args.m, quorum=args.quorum, span=args.span, **gen)
    out.mkdir(parents=True, exist_ok=True)
    rdir, html = write_result(out, "critical_neurons", cn, f"Safety-critical neurons: {cn.model_id}",
                              [("Critical neurons", cn.plot())])
    paths = [("result", rdir), ("figure", html)]
    per = cn.per_layer()
    need = max(1, math.ceil(cn.quorum * cn.n_pairs - 1e-9))
    print(f"{len(cn.neurons)} critical neurons (in the top {cn.m} of {cn.counts.size} neurons in >= {need} of "
          f"{cn.n_pairs} pairs); by layer: " + (", ".join(f"L{l} {c}" for l, c in enumerate(per) if c) or "none"))
    doc: dict[str, Any] = {"command": "neurons", "model": cn.model_id, "m": cn.m, "quorum": cn.quorum,
                           "n_pairs": cn.n_pairs, "critical_neurons": cn.neurons, "per_layer": per,
                           "misalignment_pairs": cn.misalignment, "ablation": None}
    if cn.neurons:
        ab = neuron_ablation(h, cn.neurons, harmful, harmless, n_random=args.n_random, seed=args.seed,
                             match_layers=args.match_layers,
                             generation={k: v for k, v in gen.items() if k != "progress"}, progress=gen["progress"])
        rdir2, html2 = write_result(out, "neuron_ablation", ab, f"Zero-ablation of critical neurons: {ab.model_id}",
                                    [("Misalignment and capability", ab.plot())])
        paths += [("result", rdir2), ("figure", html2)]
        d = ab.deltas()
        doc["ablation"] = {"conditions": ab.conditions, "deltas": d}
        base, crit = ab.condition("none"), ab.condition("critical")
        print(f"misalignment: none {_fmt(base['misalignment']['rate'])}, critical zeroed "
              f"{_fmt(crit['misalignment']['rate'])} (Δ {d['misalignment_critical']:+.3f}), random "
              f"(Δ mean {d['misalignment_random']:+.3f}); loss Δ critical {d['loss_critical']:+.4f}, random "
              f"{d['loss_random']:+.4f}")
    else:
        print("no neuron is in the top m of enough pairs: ablation skipped (raise --m or lower --quorum)")
    doc["seconds"] = round(time.time() - t0, 1)
    paths.append(("summary", write_summary(out, doc)))
    return done(paths, t0)


def cmd_ras(args: argparse.Namespace) -> int:
    from mechcliff.data import load_prompts
    from mechcliff.figures import load_saved
    from mechcliff.neurons import REASONING_PROMPTS, CriticalNeurons, critical_neurons, ras_series

    t0 = time.time()
    out = Path(args.out)
    harmful = _prompts(args.harmful, ("harmful",), args.n, "harmful")
    reasoning = (load_prompts(args.reasoning, limit=args.n) if args.reasoning
                 else list(REASONING_PROMPTS[:args.n] if args.n else REASONING_PROMPTS))
    base = load(args.base)
    gen = _gen(args)
    from mechcliff.model.presets import STUDY_BUDGETS, generation_budgets

    gen["max_think_tokens"], gen["max_answer_tokens"] = generation_budgets(  # as the neurons stage resolves them
        base, gen["max_think_tokens"], gen["max_answer_tokens"], short=STUDY_BUDGETS)
    paths = []
    if args.neurons:
        cn = load_saved(args.neurons)
        if not isinstance(cn, CriticalNeurons):
            raise MechcliffError(f"{args.neurons} holds a '{getattr(cn, 'KIND', '?')}' result, not critical_neurons")
    else:
        cn = critical_neurons(base, harmful, m=args.m, quorum=args.quorum, **gen)
        paths.append(("critical neurons", cn.save(out / "critical_neurons")))
    if not cn.neurons:
        raise MechcliffError(f"no critical neurons (m={cn.m}, quorum={cn.quorum:g}, {cn.n_pairs} pairs): raise --m or "
                             "lower --quorum")
    res = ras_series(base, args.finetuned, cn.neurons, safety_inputs=harmful, reasoning_inputs=reasoning,
                     n_random=args.n_random, seed=args.seed, invalid=args.invalid,
                     generation={k: v for k, v in gen.items() if k not in ("progress", "batch_size")},
                     batch_size=args.batch_size, progress=gen["progress"], log=log)
    out.mkdir(parents=True, exist_ok=True)
    rdir, html = write_result(out, "ras_series", res, f"Reciprocal activation shift: {res.base_model}",
                              [("RAS and misalignment", res.plot())],
                              notes=["Activations: each neuron's max over the tokens of an input, averaged over inputs. "
                                     "Misalignment: harmful prompts not refused (refusal-phrase judge)."])
    paths += [("result", rdir), ("figure", html)]
    for lab, r, rr, dm in zip(res.labels(), res.ras, res.ras_random_mean, res.delta_misalignment):
        print(f"{lab}: RAS critical {r['ras']:.4g} (δ⁻ safe {r['delta_safe']:.4g}, δ⁺ math {r['delta_math']:.4g}), "
              f"random {rr:.4g}, Δ misalignment {_fmt(dm)}")
    for k in ("ras", "ras_random", "kl"):
        c = res.correlations[k]
        print(f"r({k}, Δ misalignment) = {_fmt(c['r'])} (n={c['n']})")
    paths.append(("summary", write_summary(out, {"command": "ras", "base": res.base_model, "checkpoints": res.checkpoints,
                                                 "neurons": len(res.neurons), "ras": res.ras,
                                                 "ras_random_mean": res.ras_random_mean,
                                                 "delta_misalignment": res.delta_misalignment, "kl": res.kl,
                                                 "correlations": res.correlations,
                                                 "seconds": round(time.time() - t0, 1)})))
    return done(paths, t0)


COMMANDS: dict[str, Handler] = {
    "compare-modes": cmd_compare_modes,
    "refusal-heads": cmd_refusal_heads,
    "neurons": cmd_neurons,
    "ras": cmd_ras,
}
