"""Paper figures (mechcliff.figures, ``mechcliff plot``): every result kind re-renders from its saved files alone.

All results here are tiny synthetic instances (no model). A pipeline-like run folder is assembled from the same
result classes, ``Run._results`` and ``write_run_report`` the pipeline uses. Static export (PDF / PNG / SVG) needs a
Chrome or Chromium binary; those tests skip, saying so, when none is found.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest

from mechcliff import figures
from mechcliff.cli import main
from mechcliff.plotting import STYLES, apply_style

ROOT = Path(__file__).resolve().parents[1]
BROWSER = figures.find_browser()
needs_browser = pytest.mark.skipif(
    BROWSER is None, reason="no Chrome/Chromium for static export: `make browser` (root) or "
    "`.venv/bin/kaleido_get_chrome`, or set BROWSER_PATH")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_FIGURES = {"cliff_curves", "cliff_curves_normalized", "ms_histogram", "attribution_heatmap", "probe_by_layer", "asr"}
PLANTED = [(1, 3), (1, 6), (2, 1)]
N_LAYERS, N_HEADS = 4, 8


# ---- tiny synthetic results, one factory per result kind --------------------------------------------------------


def _rate(k: int, n: int, categories: bool = True) -> dict:
    from mechcliff.stats import Rate

    d = Rate.of(k, n).to_dict()
    if categories:
        d["by_category"] = {"fraud": Rate.of(k // 2, n // 2).to_dict(), "weapons": Rate.of(k - k // 2, n - n // 2).to_dict()}
    return d


def make_trace():
    from mechcliff.trace import STAT_KEYS, RefusalTrace, cliff_stats

    rng = np.random.default_rng(0)
    scores, groups, spans = [], [], []
    for g, shape in (("harmless", "low"), ("harmful", "high"), ("harmful_jailbreak", "cliff")):
        for i in range(4):
            length, t0 = 30 + 3 * i, 6
            te = length - 4
            sc = np.full(length, 0.05 if shape == "low" else 0.9) + rng.normal(0, 0.02, length)
            if shape == "cliff":
                sc[te - 1:] = 0.1
            scores.append(np.clip(sc, 0, 1).astype(np.float32))
            groups.append(g)
            spans.append((t0, te - 2, te, te + 1))
    stats = {k: [] for k in (*STAT_KEYS, "t_cliff")}
    for sc, (t0, t1, te, _) in zip(scores, spans):
        for k, v in cliff_stats(sc, (t0, t1), te).items():
            stats[k].append(v)
    return RefusalTrace(
        scores_flat=np.concatenate(scores), offsets=np.concatenate([[0], np.cumsum([len(s) for s in scores])]),
        thinking_start=np.array([s[0] for s in spans]), thinking_end=np.array([s[1] for s in spans]),
        think_end=np.array([s[2] for s in spans]), answer_start=np.array([s[3] for s in spans]),
        groups=groups, ids=[f"ex{i}" for i in range(len(groups))], stats=stats, probe_layer=3, model_id="synthetic")


def make_attribution():
    from mechcliff.attribution import HeadAttribution

    rng = np.random.default_rng(1)
    n = 5
    per = rng.normal(0, 0.3, (n, N_LAYERS, N_HEADS))
    for l, h in PLANTED:
        per[:, l, h] -= 6.0
    per[:, 0, 2] += 3.0
    mlp, embed, bias = rng.normal(0, 0.2, (n, N_LAYERS)), rng.normal(0, 0.2, n), np.zeros(n)
    logit = embed + per.sum((1, 2)) + bias + mlp.sum(1) + 0.5
    return HeadAttribution(per_example=per, mlp=mlp, embed=embed, attn_bias=bias, logit=logit, probe_bias=0.5,
                           probe_layer=3, positions=[20] * n, model_id="synthetic", groups=["harmful_jailbreak"] * n)


def make_ablation():
    from mechcliff.asr import AblationResult

    return AblationResult(heads=["L1H3", "L1H6", "L2H1"], mode="scale_z", gamma=0.0, judge="refusal",
                          asr_before=_rate(10, 10), asr_after=_rate(0, 10), asr_random=[_rate(10, 10), _rate(9, 10)],
                          random_heads=[["L0H0", "L3H1", "L2H7"], ["L0H4", "L1H1", "L3H3"]],
                          harmless_refusal_before=_rate(0, 10, False), harmless_refusal_after=_rate(0, 10, False))


def make_probe():
    from mechcliff.probe import LinearProbe

    by_layer = [{"layer": l, "val_accuracy": 0.6 + 0.1 * l, "val_auroc": 0.65 + 0.1 * l, "train_accuracy": 1.0,
                 "C": 1.0} for l in range(N_LAYERS)]
    return LinearProbe(w=np.ones(16) / 4, b=-0.3, layer=3, model_id="synthetic", model_hash="0" * 16,
                       metrics={"val_accuracy": 0.9, "val_auroc": 0.95, "by_layer": by_layer})


def make_patching():
    from mechcliff.patching import PatchingResult

    per = np.random.default_rng(2).normal(0.2, 0.1, (3, N_LAYERS, N_HEADS))
    per[:, 1, 3] = 0.9
    return PatchingResult(per_example=per, target=np.full(3, 0.1), source=np.full(3, 1.0), metric="probe_logit")


def make_position_patching():
    from mechcliff.patching import PositionPatchingResult

    per = np.random.default_rng(3).normal(0.1, 0.2, (3, N_LAYERS, 5))
    return PositionPatchingResult(per_example=per, target=np.zeros(3), source=np.ones(3), offsets=[-4, -3, -2, -1, 0],
                                  site="resid_pre", metric="probe_logit")


def make_sweep():
    from mechcliff.sweep import AblationSweepResult

    cells = []
    for k in (1, 2, 3):
        cells.append(dict(mode="scale_z", gamma=0.0, k=k, selection="ranked", seed=0, heads=["L1H3"][:k],
                          asr=1.0 if k < 3 else 0.0, asr_low=0.7 if k < 3 else 0.0, asr_high=1.0 if k < 3 else 0.3,
                          harmless_refusal=0.0, loss=2.0, kl=0.01 * k))
        for seed in (0, 1):
            cells.append(dict(mode="scale_z", gamma=0.0, k=k, selection="random", seed=seed, heads=["L0H0"], asr=1.0,
                              asr_low=0.7, asr_high=1.0, harmless_refusal=0.0, loss=2.0, kl=0.01))
    return AblationSweepResult(cells=cells, baseline={"asr": 1.0, "harmless_refusal": 0.0, "loss": 2.0})


def make_ships():
    from mechcliff.ships import HeadImportance

    per = np.abs(np.random.default_rng(4).normal(0, 0.05, (3, N_LAYERS, N_HEADS)))
    per[:, 1, 6] = 0.8
    return HeadImportance(per_example=per, mode="scale_q", eps=1e-5)


def make_sahara():
    from mechcliff.ships import SaharaResult

    return SaharaResult(heads=["L1H6", "L1H3", "L2H1"], scores=[12.0, 20.5, 24.0], mode="scale_q", eps=1e-5)


def make_selection():
    from mechcliff.selection import Selection

    pool = np.linspace(1.0, 0.0, 20)
    return Selection(method="cliff", indices=np.arange(5), ids=[f"c{i}" for i in range(5)], scores=pool[:5],
                     pool_hash="abc", pool_size=20, criteria={"score_name": "MS = plateau_mean − final"},
                     pool_scores=pool, categories=[None] * 5)


def make_finetune():
    from mechcliff.repair import FinetuneResult

    return FinetuneResult(losses=np.linspace(3.0, 1.0, 30), config={"method": "lora"}, base_model={"id": "synthetic"},
                          examples_hash="abc", n_safety=8, n_mix=8, adapter_dir="adapter", seconds=1.0)


def make_repair_curve():
    from mechcliff.repair_curve import RepairCurve

    def point(method, fraction, asr):
        return dict(method=method, fraction=fraction, asr=asr, asr_low=max(0.0, asr - 0.2), asr_high=min(1.0, asr + 0.2),
                    harmless_refusal=0.05, capability=1.1, n_selected=int(40 * fraction), seeds=2)

    points = [point("cliff", f, a) for f, a in ((0.05, 0.5), (0.1, 0.2), (0.25, 0.1))]
    points += [point("random", f, a) for f, a in ((0.05, 0.8), (0.1, 0.6), (0.25, 0.3))]
    points.append(point("all", 1.0, 0.1))
    return RepairCurve(points=points, unrepaired={"asr": 0.9, "asr_low": 0.7, "asr_high": 1.0, "harmless_refusal": 0.0,
                                                  "capability": 1.0}, pool_size=40, model_id="synthetic")


def make_safety_layers():
    from mechcliff.safety_layers import safety_layers_from_states

    rng = np.random.default_rng(5)
    base = rng.normal(size=(N_LAYERS, 16))
    safe, unsafe = base + rng.normal(0, 0.3, (4, N_LAYERS, 16)), base + rng.normal(0, 0.3, (3, N_LAYERS, 16))
    unsafe[:, 1:3] += 2.0 * rng.normal(size=16)
    return safety_layers_from_states(safe, unsafe, window=2, model_id="synthetic")


def make_spectral():
    from mechcliff.spectral import SpectralHeadMetrics

    rng = np.random.default_rng(6)
    b1, b3 = rng.uniform(0.1, 0.2, (6, N_LAYERS, N_HEADS)), rng.uniform(3, 4, (6, N_LAYERS, N_HEADS))
    for l, h in PLANTED:
        b1[3:, l, h] += 0.2
    b2 = np.abs(rng.normal(size=(6, N_LAYERS, N_HEADS, 16))).astype(np.float32)
    return SpectralHeadMetrics(b1=b1, b2=b2, b3=b3, row=np.zeros((6, N_LAYERS, N_HEADS), dtype=np.int64),
                               is_safe=np.array([1, 1, 1, 0, 0, 0]), layers=list(range(N_LAYERS)), size=16, rows=8,
                               model_id="synthetic")


def make_mode_comparison():
    from mechcliff.modes import ModeComparison

    groups = ["harmless"] * 3 + ["harmful"] * 3 + ["harmful_jailbreak"] * 3
    final = np.array([[0.1] * 3 + [0.9] * 3 + [0.2] * 3, [0.1] * 3 + [0.95] * 3 + [0.6] * 3])
    plateau = np.array([[0.1] * 3 + [0.9] * 3 + [0.9] * 3, [np.nan] * 9])
    refused = np.array([[0] * 3 + [1] * 3 + [0, 0, 1], [0] * 3 + [1] * 3 + [1, 1, 0]], dtype=np.int8)
    return ModeComparison(groups=groups, categories=[None] * 9, refused=refused, final=final, plateau=plateau,
                          ms=plateau - final, drop=np.where(np.isnan(plateau), np.nan, 0.5),
                          thinking_tokens=np.array([[12] * 9, [0] * 9]), probe_layer=3, model_id="synthetic")


def make_refusal_heads():
    from mechcliff.refusal_heads import R, RefusalHeads

    n = 5
    on = np.full((n, N_LAYERS, N_HEADS), R["bos"], dtype=np.int8)
    off = on.copy()
    on[:, 0, 3], off[:4, 0, 3] = R["assistant"], R["think_gap"]
    on[:, 2, 5], off[:2, 2, 5] = R["assistant"], R["think_gap"]
    zeros = np.zeros((n, N_LAYERS, N_HEADS))
    ab = {"position": "between", "probe_layer": 3, "n": n, "mode": "scale_z", "gamma": 0.0,
          "baseline": {"heads": [], "score": 0.8, "logit": 1.4, "scores": [0.7, 0.9, 0.8, 0.8, 0.8]},
          "targeted": {"heads": ["L0H3"], "score": 0.4, "logit": -0.4, "scores": [0.3, 0.5, 0.4, 0.4, 0.4]},
          "random": [{"heads": ["L0H1"], "score": 0.78, "logit": 1.3, "scores": [0.7, 0.8, 0.8, 0.8, 0.8]}],
          "drop_targeted": 0.4, "drop_random_mean": 0.02}
    return RefusalHeads(region_on=on, region_off=off, offset_on=zeros.astype(np.int32) - 3,
                        offset_off=zeros.astype(np.int32) - 2, weight_on=zeros + 0.5, weight_off=zeros + 0.5,
                        has_gap=np.ones(n, dtype=bool), valid=np.ones(n, dtype=bool), heads=["L0H3"], ablation=ab,
                        reference_heads=["L1H3", "L1H6", "L2H1"], model_id="synthetic")


def make_critical_neurons():
    from mechcliff.neurons import CriticalNeurons

    counts = np.random.default_rng(7).integers(0, 6, (N_LAYERS, 32)).astype(np.int32)
    counts[2, [3, 9]] = 6
    return CriticalNeurons(neurons=["L2N3", "L2N9"], counts=counts, mean_diff=np.zeros((N_LAYERS, 32), np.float32),
                           m=8, n_pairs=6, misalignment={"D": _rate(2, 6, False), "D_tilde": _rate(0, 6, False)},
                           model_id="synthetic")


def make_neuron_ablation():
    from mechcliff.neurons import NeuronAblation

    def cond(name, k, loss):
        return {"name": name, "neurons": ["L2N3", "L2N9"] if name != "none" else [], "misalignment": _rate(k, 10, False),
                "harmless_refusal": _rate(0, 10, False), "loss": loss, "kl": 0.0 if name == "none" else 0.05}

    return NeuronAblation(conditions=[cond("none", 2, 1.0), cond("critical", 5, 1.3), cond("random 0", 2, 1.05)],
                          neurons=["L2N3", "L2N9"], model_id="synthetic")


def make_ras_series():
    from mechcliff.neurons import RASSeries

    def ras(x):
        return {"delta_safe": x, "delta_math": 2 * x, "ras": 4 * x / 3, "n": 2, "n_invalid_safe": 0, "n_invalid_math": 0}

    return RASSeries(checkpoints=["ft/step-10", "ft/step-20", "ft/adapter"], ras=[ras(0.1), ras(0.2), ras(0.3)],
                     ras_random=[[ras(0.05)], [ras(0.04)], [ras(0.06)]],
                     misalignment=[_rate(3, 10, False), _rate(4, 10, False), _rate(6, 10, False)],
                     base_misalignment=_rate(2, 10, False), kl=[0.01, 0.02, 0.04], neurons=["L2N3", "L2N9"],
                     base_model="synthetic")


#: kind -> (factory, trace types its figure must have). A new result kind needs an entry here.
FACTORIES = {
    "refusal_trace": (make_trace, {"scatter"}),
    "head_attribution": (make_attribution, {"heatmap"}),
    "ablation": (make_ablation, {"bar"}),
    "linear_probe": (make_probe, {"scatter"}),
    "head_patching": (make_patching, {"heatmap"}),
    "position_patching": (make_position_patching, {"heatmap"}),
    "ablation_sweep": (make_sweep, {"scatter"}),
    "ships": (make_ships, {"heatmap"}),
    "sahara": (make_sahara, {"scatter"}),
    "selection": (make_selection, {"bar"}),
    "finetune": (make_finetune, {"scatter"}),
    "repair_curve": (make_repair_curve, {"scatter"}),
    "safety_layers": (make_safety_layers, {"scatter", "bar"}),
    "spectral_head_metrics": (make_spectral, {"heatmap", "scatter"}),
    "mode_comparison": (make_mode_comparison, {"bar", "scatter"}),
    "refusal_heads": (make_refusal_heads, {"heatmap"}),
    "critical_neurons": (make_critical_neurons, {"bar"}),
    "neuron_ablation": (make_neuron_ablation, {"bar"}),
    "ras_series": (make_ras_series, {"scatter"}),
}


def build_run_folder(root: Path) -> Path:
    """A pipeline-like run folder from synthetic results, laid out and summarised as ``mechcliff run`` does."""
    from mechcliff.data import atomic_write_text
    from mechcliff.pipeline import Run, default_config
    from mechcliff.report_run import write_run_report
    from mechcliff.results import _jsonable

    probe, trace, dpa, ab = make_probe(), make_trace(), make_attribution(), make_ablation()
    for stage, res in zip(("probe", "trace", "attribution", "ablation"), (probe, trace, dpa, ab)):
        res.save(root / stage)
    cfg = default_config("organism")
    run = Run(root, cfg, log=lambda msg: None, progress=False)
    results = _jsonable(run._results(probe, trace, dpa, ab, "harmful_jailbreak"))
    atomic_write_text(root / "results.json", json.dumps(results, indent=1, allow_nan=False))
    atomic_write_text(root / "manifest.json", json.dumps({"mechcliff_run": 1, "status": "complete",
                                                          "config": cfg.to_dict()}))
    write_run_report(root, results=results, probe=probe, trace=trace, dpa=dpa, ablation=ab,
                     ground_truth=run._ground_truth())
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return build_run_folder(tmp_path_factory.mktemp("figrun") / "run")


@pytest.fixture(scope="module")
def every_kind_dir(tmp_path_factory) -> Path:
    """One saved result of every kind, each in its own folder."""
    root = tmp_path_factory.mktemp("kinds")
    for kind, (factory, _) in FACTORIES.items():
        factory().save(root / kind)
    return root


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _axis_titles(fig) -> list[str]:
    titles = []
    for t in fig.data:
        if t.type == "heatmap":
            titles.append(t.colorbar.title.text or "")
        for letter in ("x", "y"):
            ax = fig.layout[(getattr(t, f"{letter}axis", None) or letter).replace(letter, f"{letter}axis", 1)]
            titles.append(ax.title.text or "")
    return titles


def _check_structure(fig, kind: str, style: str = "paper") -> None:
    st = STYLES[style]
    assert len(fig.data) >= 1, kind
    assert fig.layout.title.text, f"{kind}: no title"
    assert all(_axis_titles(fig)), f"{kind}: an axis (or colour bar) has no title: {_axis_titles(fig)}"
    assert fig.layout.width in (st.one_column, st.two_column) and fig.layout.height > 100
    assert fig.layout.font.size == st.font_size and fig.layout.font.family == st.font_family
    for t in fig.data:
        if t.type == "heatmap" and t.zmid == 0:  # signed: symmetric, centred at zero, diverging
            assert t.zmin == -t.zmax and t.zmax > 0
            assert t.colorscale == go.Heatmap(colorscale=st.diverging).colorscale
    in_legend = {t.legendgroup or t.name for t in fig.data if t.name and t.showlegend is not False and t.type != "heatmap"}
    if len(in_legend) >= 2:
        assert fig.layout.showlegend is True, f"{kind}: several lines but no legend"


# ---- every result kind ------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_every_result_kind_has_plot_and_a_test_factory():
    kinds = figures.result_kinds()
    assert set(FACTORIES) <= set(kinds), f"factories for kinds that do not exist: {set(FACTORIES) - set(kinds)}"
    missing = sorted(set(kinds) - set(FACTORIES))
    assert not missing, (f"result kind(s) {missing} have no synthetic instance in tests/test_figures.py FACTORIES: "
                         "add one so that their plot() is checked")
    for kind in kinds:
        cls = figures.result_class(kind)
        assert cls is not None and callable(getattr(cls, "plot", None)), f"'{kind}' results have no plot()"


@pytest.mark.unit
@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_each_kind_renders_from_its_saved_files(kind, every_kind_dir):
    specs = figures.available(every_kind_dir / kind)
    assert list(specs) == [kind] and specs[kind].sources == (".",)
    figs = figures.render(every_kind_dir / kind, style="paper")
    fig = figs[kind]
    types = {t.type for t in fig.data}
    assert FACTORIES[kind][1] <= types, f"{kind}: trace types {types}"
    _check_structure(fig, kind)


@pytest.mark.unit
def test_a_folder_of_every_kind_lists_and_renders_each(every_kind_dir):
    specs = figures.available(every_kind_dir)
    assert {s.kind for s in specs.values()} == set(FACTORIES)
    figs = figures.render(every_kind_dir, style="notebook")
    assert set(figs) == set(specs)
    for name, fig in figs.items():
        _check_structure(fig, specs[name].kind, "notebook")


@pytest.mark.unit
def test_same_kind_twice_gets_distinct_names(tmp_path):
    make_ships().save(tmp_path / "ships_a")
    make_ships().save(tmp_path / "b" / "ships")
    assert sorted(figures.available(tmp_path)) == ["ships-b-ships", "ships-ships_a"]
    assert sorted(figures.render(tmp_path, ["ships"])) == ["ships-b-ships", "ships-ships_a"]


# ---- the run folder ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_run_folder_draws_the_report_figures(run_dir):
    specs = figures.available(run_dir)
    assert set(specs) == RUN_FIGURES
    assert specs["attribution_heatmap"].sources == ("attribution",)
    figs = figures.render(run_dir, style="paper")
    for name, fig in figs.items():
        _check_structure(fig, name)
    heat = figs["attribution_heatmap"]
    hm = next(t for t in heat.data if t.type == "heatmap")
    assert hm.zmid == 0 and hm.zmin == -hm.zmax  # centred at 0
    outline = next(t for t in heat.data if t.type == "scatter")
    assert list(outline.meta) == ["L1H3", "L1H6", "L2H1"]  # the planted heads, from results.json (no organism module)
    curves = figs["cliff_curves"]
    assert curves.layout.showlegend is True and curves.layout.legend.orientation == "h"
    assert sum(1 for t in curves.data if t.showlegend is not False) == 3
    assert heat.layout.width == STYLES["paper"].one_column == 336  # 3.5 in at 96 px/in


@pytest.mark.unit
def test_kind_selection_by_name_and_by_result_kind(run_dir):
    assert sorted(figures.render(run_dir, ["asr"])) == ["asr"]
    assert sorted(figures.render(run_dir, ["refusal_trace"])) == ["cliff_curves", "cliff_curves_normalized", "ms_histogram"]
    assert sorted(figures.render(run_dir, ["head_attribution", "linear_probe"])) == ["attribution_heatmap", "probe_by_layer"]


@pytest.mark.unit
def test_extra_results_in_a_run_folder_are_drawn_too(run_dir, tmp_path):
    run = shutil.copytree(run_dir, tmp_path / "run")
    make_sweep().save(run / "sweep")
    make_ships().save(run / "ships")
    assert set(figures.available(run)) == RUN_FIGURES | {"ablation_sweep", "ships"}


@pytest.mark.unit
def test_wide_heatmaps_take_two_columns_and_thin_their_ticks():
    from mechcliff.plotting import layer_head_heatmap

    fig = apply_style(layer_head_heatmap(np.random.default_rng(0).normal(size=(30, 32))), "paper")
    assert fig.layout.width == STYLES["paper"].two_column and fig.layout.yaxis.dtick == 1  # 14 px per layer: legible
    short = apply_style(layer_head_heatmap(np.ones((30, 9))), "paper", columns=1, height=250)
    assert short.layout.yaxis.dtick >= 2  # 30 layers in ~200 px: every other label at most
    small = apply_style(layer_head_heatmap(np.ones((4, 8))), "paper")
    assert small.layout.width == STYLES["paper"].one_column and small.layout.xaxis.dtick == 1


@pytest.mark.unit
def test_head_label_ticks_are_rotated_or_thinned_when_crowded():
    def bars(n_layers):
        labels = [f"L{l}H{h}" for l in range(n_layers) for h in range(8)]
        fig = go.Figure(go.Bar(x=labels, y=np.arange(len(labels), dtype=float)))
        return labels, apply_style(fig.update_layout(title="t", xaxis_title="head", yaxis_title="v"), "paper")

    _, few = bars(1)
    assert few.layout.xaxis.tickangle in (0, -45) and few.layout.xaxis.tickvals is None
    labels, many = bars(24)
    ax = many.layout.xaxis
    assert many.layout.width == STYLES["paper"].two_column and ax.tickangle == -90
    assert 1 < len(ax.tickvals) < len(labels) and list(ax.tickvals) == list(ax.ticktext)


@pytest.mark.unit
def test_apply_style_does_not_modify_its_input():
    from mechcliff.plotting import probe_by_layer

    fig = probe_by_layer([0, 1], [0.5, 0.6], [0.5, 0.7])
    before = fig.to_json()
    apply_style(fig, "paper")
    assert fig.to_json() == before


# ---- CLI ----------------------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_cli_kind_lists_what_the_folder_can_draw(run_dir, capsys):
    for argv in (["--kind"], ["--kind", "list"]):
        rc, out, _ = _cli(capsys, "plot", str(run_dir), *argv)
        assert rc == 0
        for name in RUN_FIGURES:
            assert name in out
        assert "head_attribution" in out and "attribution/" in out


@pytest.mark.unit
def test_cli_html_only_needs_no_browser(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-browser"))
    rc, out, err = _cli(capsys, "plot", str(run_dir), "--format", "html", "--out", str(tmp_path / "h"), "--kind", "asr")
    assert rc == 0, err
    html = (tmp_path / "h" / "asr.html").read_text()
    assert '<script src="plotly.min.js"' in html or "plotly.min.js" in html
    assert (tmp_path / "h" / "plotly.min.js").stat().st_size > 100_000


@pytest.mark.unit
def test_cli_without_browser_says_how_to_fix_and_still_writes_html(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-browser"))
    rc, out, err = _cli(capsys, "plot", str(run_dir), "--format", "pdf,png", "--out", str(tmp_path / "o"))
    assert rc == 1
    assert "no Chrome/Chromium" in err and "apt-get install -y chromium" in err and "kaleido_get_chrome" in err
    assert "BROWSER_PATH" in err
    assert sorted(p.name for p in (tmp_path / "o").glob("*.html")) == sorted(f"{n}.html" for n in RUN_FIGURES)
    assert not list((tmp_path / "o").glob("*.pdf"))


@pytest.mark.unit
@pytest.mark.parametrize("case", ["missing", "file", "empty", "foreign_manifest", "newer_manifest"])
def test_cli_not_a_run_folder(case, tmp_path, capsys):
    target = tmp_path / "x"
    if case == "file":
        target.write_text("hello")
    elif case != "missing":
        target.mkdir()
    if case == "foreign_manifest":
        (target / "manifest.json").write_text('{"name": "something else"}')
    if case == "newer_manifest":
        (target / "manifest.json").write_text('{"mechcliff_run": 7}')
    rc, out, err = _cli(capsys, "plot", str(target))
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mechcliff: error: "), err
    expected = {"missing": "does not exist", "file": "is not a folder", "empty": "not a mechcliff run folder",
                "foreign_manifest": "not a mechcliff run folder", "newer_manifest": "newer mechcliff"}[case]
    assert expected in err


@pytest.mark.unit
def test_cli_newer_result_format_is_a_clear_error(run_dir, tmp_path, capsys):
    run = shutil.copytree(run_dir, tmp_path / "run")
    doc = json.loads((run / "trace" / "result.json").read_text())
    doc["format_version"] = 99
    (run / "trace" / "result.json").write_text(json.dumps(doc))
    rc, _, err = _cli(capsys, "plot", str(run), "--format", "html")
    assert rc == 2
    assert "newer mechcliff" in err and "99" in err and "trace" in err and "upgrade" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.unit
def test_cli_unknown_kind_is_a_clear_error(run_dir, capsys):
    rc, _, err = _cli(capsys, "plot", str(run_dir), "--kind", "nosuch", "--format", "html")
    assert rc == 2 and "unknown kind 'nosuch'" in err and "cliff_curves" in err
    rc, _, err = _cli(capsys, "plot", str(run_dir), "--kind", "ships", "--format", "html")
    assert rc == 2 and "holds no 'ships' result" in err


@pytest.mark.unit
def test_cli_bad_format_and_style(run_dir, capsys):
    rc, _, err = _cli(capsys, "plot", str(run_dir), "--format", "pdf,gif")
    assert rc == 2 and "unknown format(s) gif" in err
    rc, _, err = _cli(capsys, "plot", str(run_dir), "--style", "poster", "--format", "html")
    assert rc == 2 and "unknown style 'poster'" in err and "paper" in err


@pytest.mark.unit
def test_unknown_saved_kind_is_skipped_not_fatal(run_dir, tmp_path, capsys):
    run = shutil.copytree(run_dir, tmp_path / "run")
    (run / "future").mkdir()
    (run / "future" / "result.json").write_text(json.dumps({"kind": "from_the_future", "format_version": 1,
                                                            "fields": {}, "arrays": []}))
    rc, out, _ = _cli(capsys, "plot", str(run), "--kind")
    assert rc == 0 and "from_the_future" in out and "skipped" in out
    assert set(figures.render(run)) == RUN_FIGURES


# ---- static export (needs a browser) ------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.external  # Chromium (tens of seconds)
@needs_browser
def test_export_every_kind_to_valid_pdf_and_png(every_kind_dir, tmp_path):
    figs = figures.render(every_kind_dir, style="paper")
    report = figures.export(figs, tmp_path, ("pdf", "png"), style="paper")
    assert not report.missing_browser and report.browser
    assert report.n_files == 2 * len(figs) == 2 * len(FACTORIES)
    for name in figs:
        pdf, png = tmp_path / f"{name}.pdf", tmp_path / f"{name}.png"
        assert pdf.read_bytes()[:4] == b"%PDF" and pdf.stat().st_size > 1000, name
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000, name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export-")]  # temporary files cleaned up
    # paper size: one column is 3.5 in = 252 pt wide in the PDF; PNG at 300 dpi
    one = next(n for n, f in figs.items() if f.layout.width == STYLES["paper"].one_column)
    media = (tmp_path / f"{one}.pdf").read_bytes()
    assert b"/MediaBox [0 0 252 " in media
    png = (tmp_path / f"{one}.png").read_bytes()
    assert int.from_bytes(png[16:20], "big") == round(336 * 300 / 96)  # IHDR width: 1050 px


@pytest.mark.unit
@pytest.mark.external  # a fresh interpreter and Chromium
def test_demo_like_run_plots_without_model_libraries(run_dir, every_kind_dir, tmp_path):
    """`mechcliff plot` in a fresh interpreter: no transformers / transformer_lens import (for the run's figures and
    for every result kind), an empty model cache."""
    out = tmp_path / "out"
    fmt = "pdf,png,svg" if BROWSER else "html"
    code = (
        "import json, sys\n"
        "from mechcliff.cli import main\n"
        f"rc = main(['plot', {str(run_dir)!r}, '--format', {fmt!r}, '--style', 'paper', '--out', {str(out)!r}])\n"
        f"rc2 = main(['plot', {str(every_kind_dir)!r}, '--format', 'html', '--out', {str(tmp_path / 'kinds')!r}])\n"
        "print('RESULT ' + json.dumps({'rc': rc, 'rc2': rc2, 'loaded': [m for m in ('transformers', "
        "'transformer_lens') if m in sys.modules]}))\n"
    )
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    env = {**os.environ, "MECHCLIFF_CACHE": str(cache), "HF_HOME": str(cache / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, proc.stdout + proc.stderr
    res = json.loads(line[len("RESULT "):])
    assert res["rc"] == 0 and res["rc2"] == 0, proc.stderr
    assert len(list((tmp_path / "kinds").glob("*.html"))) == len(FACTORIES)
    assert res["loaded"] == [], f"plotting imported {res['loaded']}"
    for name in RUN_FIGURES:
        for ext in fmt.split(","):
            f = out / f"{name}.{ext}"
            assert f.stat().st_size > 500, f
            if ext == "pdf":
                assert f.read_bytes()[:4] == b"%PDF"
            if ext == "png":
                assert f.read_bytes()[:8] == PNG_MAGIC
            if ext == "svg":
                assert b"<svg" in f.read_bytes()[:500]
    assert not list(cache.iterdir())  # nothing was downloaded or converted


@pytest.mark.unit
def test_a_folder_of_run_folders_draws_each_run_in_its_own_subfolder(run_dir, tmp_path, capsys):
    """Issue 16 item 8: `mechcliff plot PARENT` on a folder holding several runs wrote 0 files."""
    import shutil

    parent = tmp_path / "runs"
    for name in ("seed0", "seed1"):
        shutil.copytree(run_dir, parent / name, ignore=shutil.ignore_patterns("figures"))
    one = {n for n, s in figures.available(run_dir).items() if not s.note and not figures._bulk(s, figures.available(run_dir))}
    rc, out, _ = _cli(capsys, "plot", str(parent), "--kind")
    assert rc == 0 and all(f"seed0/{n}" in out and f"seed1/{n}" in out for n in one)
    rc, out, err = _cli(capsys, "plot", str(parent), "--format", "html")
    assert rc == 0, err
    for run in ("seed0", "seed1"):
        written = {p.stem for p in (parent / "figures" / "paper" / run).glob("*.html")}
        assert written == one, (run, written ^ one)
        assert (parent / "figures" / "paper" / run / "plotly.min.js").exists()  # each page opens offline
    assert f"wrote {2 * len(one)} file(s) for {2 * len(one)} figure(s)" in out
