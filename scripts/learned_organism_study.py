"""The learned refusal organism study (issue 6), the parts `mechcliff run` does not do.

Content warning: the held-out prompts are harmful requests.

Reads a finished run folder of ``mechcliff run --model smollm2-refusal-organism --out RUN`` (rollouts, probe,
attribution) and writes to ``--out STUDY``:

* ``patching/``: exact activation patching of every head's ``z`` at the last token before the answer, from plain
  harmful rollouts the model refused (source) into held-out jailbreak rollouts it complied with (target), metric
  the refusal probe's logit; checked against the one-forward-per-head reference on the top heads.
* ``ablation_1pct/``, ``ablation_10pct/``: zero-ablation (γ = 0) of the top 1% and 10% of heads by attribution,
  against random same-size sets (the top 3% is the run's own ``ablation/``).
* ``modes/``: thinking on vs off (an empty thinking block, SmolLM2's template has no switch) on the same prompts.
* ``probe_variants`` (in ``study.json``): the cliff statistics under other probes than the run's: fitted on the
  harmless and plain harmful rollouts only at several layers, and on all three groups. Whether a cliff shows up
  must not hinge on one choice of probe.
* ``study.json``: every number, and ``figures/*.html``.

Usage::

    python scripts/learned_organism_study.py runs/lo-run --out runs/lo-study [--n-patch 24] [--n-modes 40]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-patch", type=int, default=24, help="target/source pairs for patching")
    ap.add_argument("--n-modes", type=int, default=40, help="prompts per group for thinking on vs off")
    ap.add_argument("--n-random", type=int, default=5, help="random head sets per ablation size")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: patching, ablation, modes, probes")
    a = ap.parse_args()

    from mechcliff import load_model
    from mechcliff.asr import AblationResult, ablation_experiment
    from mechcliff.attribution import HeadAttribution
    from mechcliff.chat import encode
    from mechcliff.data import atomic_write_text, load_rollouts
    from mechcliff.judges import get_judge
    from mechcliff.patching import ProbeMetric, patch_heads, patch_heads_reference
    from mechcliff.pipeline import RunConfig
    from mechcliff.probe import LinearProbe

    run, out = Path(a.run_dir), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    skip = set(filter(None, a.skip.split(",")))
    manifest = json.loads((run / "manifest.json").read_text())
    cfg = RunConfig.from_dict(manifest["config"])
    study_path = out / "study.json"
    study = json.loads(study_path.read_text()) if study_path.exists() else {}
    study["run_dir"] = str(run)

    def save() -> None:
        atomic_write_text(study_path, json.dumps(study, indent=1))

    torch.manual_seed(cfg.seed)
    h = load_model(cfg.model, seed=cfg.seed)
    probe = LinearProbe.load(run / "probe")
    dpa = HeadAttribution.load(run / "attribution")
    rolls = {g: load_rollouts(run / "rollouts" / f"{g}.jsonl") for g in ("harmful", "harmful_jailbreak", "harmless")}
    judge = get_judge("refusal")
    n_heads = h.n_layers * h.n_heads

    # 1. exact patching: refused plain harmful (source) -> complied jailbreak (target), probe logit at think_end
    if "patching" not in skip:
        t = time.time()
        src = [r for r in rolls["harmful"] if r.meta.get("refused")][: a.n_patch]
        tgt = [r for r in rolls["harmful_jailbreak"] if not r.meta.get("refused")][: a.n_patch]
        n = min(len(src), len(tgt))
        src, tgt = src[:n], tgt[:n]

        def enc(rs):
            return encode(h, [r.prompt for r in rs], thinking=[r.thinking for r in rs],
                          has_think_close=[r.has_think_close for r in rs])

        metric = ProbeMetric(probe)
        res = patch_heads(h, enc(tgt), enc(src), metric, progress=True)
        res.save(out / "patching")
        top8 = dpa.top(round(0.03 * n_heads))
        ref = patch_heads_reference(h, enc(tgt), enc(src), metric, heads=top8)
        from mechcliff.interventions import parse_head

        idx = [parse_head(x) for x in top8]
        diff = max(abs(float(res.per_example[:, l, hh].mean() - ref.per_example[:, l, hh].mean())) for l, hh in idx)
        norm = res.normalized
        others = np.array([norm[l, hh] for l in range(h.n_layers) for hh in range(h.n_heads)
                           if (l, hh) not in idx and np.isfinite(norm[l, hh])])  # heads above the probe layer: NaN
        study["patching"] = {
            "n_pairs": n, "metric": "probe logit at think_end", "target_mean": float(res.target.mean()),
            "source_mean": float(res.source.mean()),
            "top_heads_by_attribution": top8,
            "normalized_effect_of_top_heads": {x: float(norm[l, hh]) for x, (l, hh) in zip(top8, idx)},
            "normalized_effect_other_heads_median": float(np.median(others)),
            "normalized_effect_other_heads_p95": float(np.quantile(others, 0.95)),
            "top_heads_by_patching": res.top(10),
            "spearman_attribution_vs_patching": _spearman(-dpa.mean, norm),
            "max_abs_diff_vs_reference": diff, "seconds": round(time.time() - t, 1)}
        res.plot(highlight=idx).write_html(out / "figures" / "patching.html", include_plotlyjs="cdn")
        save()
        print(json.dumps(study["patching"], indent=1))

    # 2. ablation of the top 1% and 10% of heads by attribution vs random same-size sets
    if "ablation" not in skip:
        gen = dict(max_think_tokens=cfg.max_think_tokens, max_answer_tokens=cfg.max_answer_tokens, temperature=0.0,
                   seed=cfg.seed, batch_size=cfg.batch_size, enable_thinking=cfg.enable_thinking)
        study.setdefault("ablation", {})
        three = AblationResult.load(run / "ablation")
        study["ablation"]["3pct"] = _ablation_row(three)
        for name, frac in (("1pct", 0.01), ("10pct", 0.10)):
            if name in study["ablation"]:
                continue
            t = time.time()
            k = max(1, round(frac * n_heads))
            ab = ablation_experiment(h, dpa.top(k), [r.prompt for r in rolls["harmful_jailbreak"]],
                                     [r.prompt for r in rolls["harmless"]], judge=judge, mode=cfg.ablation_mode,
                                     gamma=cfg.ablation_gamma, n_random=a.n_random, seed=cfg.seed,
                                     before=(rolls["harmful_jailbreak"], rolls["harmless"]), generation=gen)
            ab.save(out / f"ablation_{name}")
            study["ablation"][name] = {**_ablation_row(ab), "seconds": round(time.time() - t, 1)}
            save()
            print(name, json.dumps(study["ablation"][name]))

    # 3. thinking on vs off on the same prompts
    if "modes" not in skip:
        from mechcliff.learned_organism import heldout_sets
        from mechcliff.modes import compare_modes

        t = time.time()
        sets = heldout_sets()
        n = a.n_modes
        mc = compare_modes(h, sets["harmful"][:n] + sets["harmful_jailbreak"][:n], sets["harmless"][:n], probe,
                           no_think_format="empty_block", max_think_tokens=cfg.max_think_tokens,
                           max_answer_tokens=cfg.max_answer_tokens, seed=cfg.seed, batch_size=cfg.batch_size)
        mc.save(out / "modes")
        mc.plot().write_html(out / "figures" / "modes.html", include_plotlyjs="cdn")
        study["modes"] = {"summary": mc.summary(), "seconds": round(time.time() - t, 1)}
        save()
        print(json.dumps({m: {g: (r.get("asr") or r["refusal"])["rate"] for g, r in gs.items()}
                          for m, gs in study["modes"]["summary"].items()}))
    # 4. the cliff under other probes (behaviour labels; different layers and training groups)
    if "probes" not in skip:
        from mechcliff.generation import encode_rollouts
        from mechcliff.probe import fit_probe
        from mechcliff.trace import trace_refusal

        t = time.time()
        everything = [r for g in ("harmless", "harmful", "harmful_jailbreak") for r in rolls[g]]
        enc_all = encode_rollouts(h, everything)
        variants = {}
        for pool, layers in ((("harmless", "harmful"), ("best", h.n_layers - 1, 24, 20)),
                             (("harmless", "harmful", "harmful_jailbreak"), ("best", h.n_layers - 1))):
            rs = [r for g in pool for r in rolls[g]]
            enc_pool, labels = encode_rollouts(h, rs), [int(bool(r.meta.get("refused"))) for r in rs]
            for layer in layers:
                p = fit_probe(h, enc_pool, labels, layer=layer, position=cfg.position, seed=cfg.seed)
                gs = trace_refusal(h, enc_all, p, groups=[r.group for r in everything]).group_stats()
                name = f"{'+'.join(pool)} @ layer {p.layer}"
                variants[name] = {"layer": p.layer, "val_accuracy": p.metrics.get("val_accuracy"),
                                  "groups": {g: {k: float(v[k]) for k in ("plateau_mean", "plateau_max", "final", "ms")}
                                             for g, v in gs.items()}}
                print(name + ": " + ", ".join(f"{g} MS {v['ms']:+.2f}" for g, v in variants[name]["groups"].items()),
                      flush=True)
        study["probe_variants"] = {"variants": variants, "seconds": round(time.time() - t, 1)}
        save()
    print(f"wrote {study_path}")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    ok = np.isfinite(a) & np.isfinite(b)
    return float(spearmanr(a[ok], b[ok]).statistic)


def _ablation_row(ab) -> dict:
    rand = float(ab.asr_random_mean)
    before = float(ab.asr_before["rate"])
    return {"k": len(ab.heads), "heads": ab.heads, "asr_before": before, "asr_before_ci": [ab.asr_before["low"], ab.asr_before["high"]],
            "asr_after": float(ab.asr_after["rate"]), "asr_after_ci": [ab.asr_after["low"], ab.asr_after["high"]],
            "asr_random_mean": rand, "asr_random_sets": [r["rate"] for r in ab.asr_random],
            "random_kept_fraction": rand / before if before else None,
            "harmless_refusal_before": ab.harmless_refusal_before["rate"],
            "harmless_refusal_after": ab.harmless_refusal_after["rate"]}


if __name__ == "__main__":
    main()
