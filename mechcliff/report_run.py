"""The HTML report of a run folder, and its figures, made from saved results only (no model needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mechcliff.data import atomic_write_text
from mechcliff.fmt import fmt
from mechcliff.interventions import parse_head


def run_figures(results: dict[str, Any], probe: Any, trace: Any, dpa: Any, ablation: Any,
                ground_truth: Any = None) -> dict[str, Any]:
    """All figures of a run, by kind."""
    from mechcliff.plotting import cliff_curves, cliff_histogram, probe_by_layer

    by_layer = probe.metrics["by_layer"]
    planted = list(ground_truth.planted_suppression_heads) if ground_truth is not None else None
    g = np.asarray(trace.groups)
    ms = np.asarray(trace.stats["ms"], dtype=float)
    figs = {
        "cliff_curves": cliff_curves(trace.curves()),
        "cliff_curves_normalized": cliff_curves(
            {grp: trace.normalized_curve(grp) for grp in trace.group_names()},
            title="Refusal intention over the thinking (normalised position)",
            x_title="position from thinking start (0) to the last closing token (1)", marker_x=1.0),
        "attribution_heatmap": dpa.plot(highlight=planted,
                                        title=f"Direct probe attribution at t_cliff ({results['attribution']['group']})"),
        "probe_by_layer": probe_by_layer([r["layer"] for r in by_layer], [r["val_accuracy"] for r in by_layer],
                                         [r["val_auroc"] for r in by_layer], chosen_layer=probe.layer),
        "asr": ablation.plot(),
    }
    if np.isfinite(ms).any():  # MS is undefined without thinking (e.g. thinking-off runs)
        figs["ms_histogram"] = cliff_histogram({grp: ms[g == grp] for grp in trace.group_names()})
    return figs


def write_run_report(run_dir: str | Path, *, results: dict[str, Any], probe: Any, trace: Any, dpa: Any, ablation: Any,
                     ground_truth: Any = None) -> Path:
    """Write ``figures/<kind>.json`` (Plotly JSON, re-renderable) and the self-contained ``report.html``."""
    from mechcliff.report import html_table, write_report

    run_dir = Path(run_dir)
    figs = run_figures(results, probe, trace, dpa, ablation, ground_truth)
    for kind, fig in figs.items():
        atomic_write_text(run_dir / "figures" / f"{kind}.json", fig.to_json())
    ab = results["ablation"]
    att = results["attribution"]
    summary = [
        ("model", str(results["model"])),
        ("probe", f"layer {probe.layer}, {probe.label_source} labels, val accuracy {dict(probe.summary_rows())['val accuracy']}, "
                  f"AUROC {fmt(probe.metrics['val_auroc'], 3)}"),
        ("top suppression heads", ", ".join(att["top_suppression_heads"][:5])),
        ("DPA exact", f"{att['exact']} (max |Σ components − logit| = {att['exact_max_abs_error']:.2e})"),
        ("ASR before / after / random heads", f"{fmt(ab['asr_before'])} / {fmt(ab['asr_after'])} / {fmt(ab['asr_random_heads'])}"),
        ("harmless refusal before / after", f"{fmt(ab['harmless_refusal_before'])} / {fmt(ab['harmless_refusal_after'])}"),
    ]
    if ab.get("baseline_generated"):
        summary.append(("imported rollouts", f"{', '.join(ab['baseline_generated'])}: probe, trace and attribution read the "
                        "imported text; the ASR 'before' is the model's own generation of those prompts"))
    if "organism" in results:
        summary.append(("planted heads (ground truth)", ", ".join(results["organism"]["planted_suppression_heads"])
                        + ("  — recovered" if results["organism"]["recovered_top_k"] else "  — NOT recovered")))
    cliff_rows = [[grp, s["n"], s["plateau_max"], s["plateau_mean"], s["final"], s["ms"], s["drop"], s["t_cliff_rel"]]
                  for grp, s in results["cliff"]["groups"].items()]
    cliff_table = html_table(["group", "n", "plateau max", "plateau mean", "final (I′)", "MS = plateau − final",
                              "largest drop", "t_cliff (rel. to last closing token)"], cliff_rows)
    asr_table = html_table(["condition", "ASR", "95% low", "95% high", "harmless refusal"], ablation.table_rows())
    heads = [parse_head(h) for h in att["top_suppression_heads"][:10]]
    m = dpa.mean
    head_table = html_table(["head", "mean contribution to probe logit"], [[f"L{l}H{h}", float(m[l, h])] for l, h in heads])
    sections = [
        ("Refusal intention around the end of thinking", figs["cliff_curves"]),
        ("Cliff statistics per group", cliff_table),
        ("Refusal intention over the thinking (normalised position)", figs["cliff_curves_normalized"]),
        ("Direct probe attribution (layer × head)", figs["attribution_heatmap"]),
        ("Strongest refusal-suppression heads", head_table),
        ("Attack success rate: before, after ablation, random heads", figs["asr"]),
        ("ASR table", asr_table),
        ("Probe accuracy by layer", figs["probe_by_layer"]),
    ]
    if "ms_histogram" in figs:
        sections.insert(3, ("Misalignment score per example", figs["ms_histogram"]))
    notes = [
        "Probe score: sigmoid(w · resid_post[layer] + b), logistic regression (scikit-learn).",
        f"MS = plateau ({trace.plateau} over thinking tokens) − final score at the last closing-template token; "
        "t_cliff = token of the largest one-step fall of the score (definitions: mechcliff.trace).",
        "ASR: fraction of attack prompts whose final answer (after </think>) is not judged a refusal by the "
        "refusal-phrase judge; intervals are Wilson 95%.",
        "Interventions never modify weights. Refusal-restoring and refusal-removing interventions use the same API.",
    ]
    path = run_dir / "report.html"
    write_report(path, title=f"mechcliff run: {results['model']}", summary_rows=summary, sections=sections, notes=notes)
    return path
