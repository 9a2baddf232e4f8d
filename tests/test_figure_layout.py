"""Layout tests of figures as they are seen (issue 16): legends over no data, ticks where they are read, no text
struck through by a line, x labels that do not run together, axis ranges fitted to the data, every spectral metric.

Everything is checked on the figure object (no browser): positions are estimated in CSS pixels from the figure's
size, margins and fonts, the way plotly lays them out. Figures are checked as ``plot()`` / :mod:`mechcliff.plotting`
make them (the notebook / HTML look) and after :func:`mechcliff.plotting.apply_style` (``"paper"``, PDF pages).
"""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import pytest

from mechcliff.plotting import STYLES, TEMPLATE, apply_style, cliff_curves, cliff_histogram, probe_by_layer

STYLE_CASES = ["notebook", "paper"]  # "notebook": the figure as made; "paper": apply_style(fig, "paper")


def _styled(fig: go.Figure, style: str) -> go.Figure:
    return fig if style == "notebook" else apply_style(fig, style)


def _plot_px(fig: go.Figure) -> tuple[float, float]:
    """Width and height in px of the plot area (the figure less its margins; plotly's 700 x 450 when unsized)."""
    lay = fig.layout
    w, h = lay.width or 700, lay.height or 450
    m = _margins(fig)
    return w - m["l"] - m["r"], h - m["t"] - m["b"]


def _margins(fig: go.Figure) -> dict[str, float]:
    tm, lm = TEMPLATE.layout.margin, fig.layout.margin
    return {k: getattr(lm, k) if getattr(lm, k) is not None else getattr(tm, k) for k in "lrtb"}


def _font_size(fig: go.Figure, font: object = None) -> float:
    size = getattr(font, "size", None) if font is not None else None
    return float(size or fig.layout.font.size or TEMPLATE.layout.font.size or 12)


def _legend_outside_plot(legend: go.layout.Legend) -> bool:
    """Whether the legend box lies wholly outside the plot area (above it, or right of it)."""
    above = legend.y is not None and legend.y >= 1 and legend.yanchor == "bottom"
    right = legend.x is not None and legend.x >= 1 and legend.xanchor == "left"
    return above or right


def _linear_ticks(ax) -> list[float]:
    """Tick positions of an axis whose ticks are fixed (``tickvals``, or ``tick0`` + ``dtick``) within its range."""
    lo, hi = sorted(ax.range)
    if ax.tickmode == "array":
        return [float(v) for v in ax.tickvals if lo - 1e-9 <= v <= hi + 1e-9]
    assert ax.tick0 is not None and ax.dtick is not None, "ticks are left to plotly's autotick"
    d, t0 = float(ax.dtick), float(ax.tick0)
    k0, k1 = math.ceil((lo - t0) / d - 1e-9), math.floor((hi - t0) / d + 1e-9)
    return [t0 + k * d for k in range(k0, k1 + 1)]


def _annotation(fig: go.Figure, word: str):
    hits = [a for a in fig.layout.annotations if a.text and word in a.text]
    assert len(hits) == 1, [a.text for a in fig.layout.annotations]
    return hits[0]


# ---- 23. cliff curves: the legend covers no data ------------------------------------------------------------------


def _trace():
    from test_figures import make_trace

    return make_trace()


@pytest.mark.unit
@pytest.mark.parametrize("style", STYLE_CASES)
def test_cliff_curves_legend_is_outside_the_plot_area(style):
    """The aligned curves fill the plot from x = -30 (the harmless band sits at the bottom left, the refusing groups
    at the top left): a legend inside the plot covers data wherever it is anchored."""
    fig = _styled(_trace().plot(), style)
    assert fig.layout.showlegend is not False
    assert _legend_outside_plot(fig.layout.legend), fig.layout.legend
    assert fig.layout.legend.orientation == "h"  # one row above the plot, not a column in the margin
    normalized = _styled(cliff_curves({g: _trace().normalized_curve(g) for g in _trace().group_names()},
                                      marker_x=1.0), style)
    assert _legend_outside_plot(normalized.layout.legend)


@pytest.mark.unit
def test_cliff_curves_legend_row_stays_below_the_title():
    """Above the plot means between the title (centred in the top margin) and the plot: the two do not meet."""
    fig = _trace().plot()
    t, (_, ph) = _margins(fig)["t"], _plot_px(fig)
    title_bottom = t / 2 + 0.65 * _font_size(fig, TEMPLATE.layout.title.font)
    legend_top = t - (fig.layout.legend.y - 1) * ph - (_font_size(fig) * 1.3 + 10)  # one row, px from the top
    assert legend_top >= title_bottom, (legend_top, title_bottom)


# ---- 24. MS histogram: bars side by side, a tick at 0, no bar clipped ---------------------------------------------


def _ms_groups(offset: float = 0.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"harmless": rng.normal(0.02, 0.03, 40) + offset,
            "harmful_jailbreak": np.r_[rng.normal(0.05, 0.04, 20), rng.normal(0.6, 0.1, 20)] + offset}


def _bin_edges(trace) -> tuple[float, float, float]:
    """First and last edge of the bins that hold data, and the bin width."""
    start, size = float(trace.xbins.start), float(trace.xbins.size)
    x = np.asarray(trace.x, dtype=float)
    last = start + (math.floor((x.max() - start) / size + 1e-9) + 1) * size
    return start, last, size


@pytest.mark.unit
@pytest.mark.parametrize("style", STYLE_CASES)
@pytest.mark.parametrize("offset", [0.0, 0.3, -0.9])
def test_ms_histogram_bars_side_by_side_zero_tick_and_padded_range(style, offset):
    fig = _styled(cliff_histogram(_ms_groups(offset)), style)
    hists = [t for t in fig.data if t.type == "histogram"]
    assert len(hists) == 2
    # no bar drawn over another: no blended colour the legend does not explain
    assert fig.layout.barmode == "group"
    assert all(t.opacity is None or t.opacity == 1 for t in hists)
    assert len({t.marker.color for t in hists}) == 2
    assert all(t.xbins.start == hists[0].xbins.start and t.xbins.size == hists[0].xbins.size for t in hists)
    # every bar whole: the range reaches half a bin beyond the first and the last bin holding data
    ax = fig.layout.xaxis
    assert ax.range is not None
    lo, hi = ax.range
    for t in hists:
        first, last, size = _bin_edges(t)
        assert lo <= first - size / 2 + 1e-9 and hi >= last + size / 2 - 1e-9, (ax.range, first, last, size)
    pooled = np.concatenate([np.asarray(t.x, dtype=float) for t in hists])
    size = float(hists[0].xbins.size)
    assert lo >= min(pooled.min(), 0.0) - 2 * size and hi <= max(pooled.max(), 0.0) + 2 * size  # but no further
    # MS = 0 (no drop at the end of thinking) is always on the axis and labelled
    ticks = _linear_ticks(ax)
    assert lo < 0 < hi and any(abs(v) < 1e-12 for v in ticks), ticks
    assert 4 <= len(ticks) <= 12
    # bin edges fall on multiples of the bin width, so 0 is an edge and ticks line up with bars
    start = float(hists[0].xbins.start)
    assert abs(start / size - round(start / size)) < 1e-6


@pytest.mark.unit
def test_ms_histogram_single_value_and_nan_groups():
    fig = cliff_histogram({"a": np.array([0.5, 0.5]), "b": np.array([np.nan, 0.5])})
    assert fig.layout.xaxis.range is not None, "x range left to plotly's autorange"
    lo, hi = fig.layout.xaxis.range
    assert lo < 0 < hi and lo < 0.5 < hi
    assert fig.data[1].name == "b (n=1)"


# ---- 25. probe by layer: the "chosen layer" note is struck by no line ----------------------------------------------


def _probe_cases():
    layers = [0, 1, 2, 3]
    return {
        "last": probe_by_layer(layers, [0.6, 0.7, 0.8, 0.9], [0.65, 0.75, 0.85, 1.0], chosen_layer=3),
        "first": probe_by_layer(layers, [0.9, 0.7, 0.6, 0.55], [1.0, 0.8, 0.7, 0.6], chosen_layer=0),
        "middle": probe_by_layer([0, 4, 8, 12], [0.6, 0.8, 0.9, 0.85], [0.65, 0.85, 0.95, 0.9], chosen_layer=8),
    }


def _data_x_to_px(fig, x: float) -> float:
    lo, hi = fig.layout.xaxis.range
    return (x - lo) / (hi - lo) * _plot_px(fig)[0]


def _text_rows_px(fig, ann) -> tuple[float, float]:
    """(bottom, top) px of an annotation's text box, up from the plot area's bottom edge."""
    _, ph = _plot_px(fig)
    height = _font_size(fig, ann.font) * 1.3 + 4
    y_lo, y_hi = fig.layout.yaxis.range
    y = ann.y * ph if ann.yref in ("y domain", "paper") else (ann.y - y_lo) / (y_hi - y_lo) * ph
    y += ann.yshift or 0
    bottom = {"bottom": y, "top": y - height, "middle": y - height / 2}[ann.yanchor or "middle"]
    return bottom, bottom + height


def _text_cols_px(fig, ann) -> tuple[float, float]:
    """(left, right) px of an annotation's text box, from the plot area's left edge."""
    pw, _ = _plot_px(fig)
    width = len(ann.text) * 0.6 * _font_size(fig, ann.font) + 6
    assert fig.layout.xaxis.range is not None, "x range left to plotly's autorange: text positions unknown"
    x = ann.x * pw if ann.xref in ("x domain", "paper") else _data_x_to_px(fig, ann.x)
    left = {"left": x, "right": x - width, "center": x - width / 2}[ann.xanchor or "center"] + (ann.xshift or 0)
    return left, left + width


def _y_to_px(fig, y: float) -> float:
    lo, hi = fig.layout.yaxis.range
    return (y - lo) / (hi - lo) * _plot_px(fig)[1]


@pytest.mark.unit
@pytest.mark.parametrize("style", STYLE_CASES)
@pytest.mark.parametrize("case", ["last", "first", "middle"])
def test_probe_chosen_layer_note_sits_on_no_line(style, case):
    fig = _styled(_probe_cases()[case], style)
    ann = _annotation(fig, "chosen layer")
    bottom, top = _text_rows_px(fig, ann)
    pw, ph = _plot_px(fig)
    # horizontal lines: the data (at most 1), the chance line, the gridlines at the y ticks
    ys = [float(v) for t in fig.data for v in t.y if v is not None and np.isfinite(v)]
    ys += [s.y0 for s in fig.layout.shapes if s.y0 == s.y1 and s.yref == "y"]
    marker_px = 6
    for y in ys:
        assert not (bottom - marker_px <= _y_to_px(fig, y) <= top + marker_px), (y, bottom, top)
    for y in _linear_ticks(fig.layout.yaxis):
        assert not (bottom - 1 <= _y_to_px(fig, y) <= top + 1), ("gridline", y, bottom, top)
    # vertical lines: the chosen-layer line itself is beside the text, not through it
    left, right = _text_cols_px(fig, ann)
    chosen = [s.x0 for s in fig.layout.shapes if s.x0 == s.x1][0]
    x_px = _data_x_to_px(fig, chosen)
    assert not (left < x_px < right), (left, x_px, right)
    assert 0 <= left and right <= pw and top <= ph + 1, (left, right, top, pw, ph)  # inside the plot area


@pytest.mark.unit
@pytest.mark.parametrize("style", STYLE_CASES)
@pytest.mark.parametrize("case", ["last", "first", "middle"])
def test_probe_chance_note_and_legend_are_clear_of_lines(style, case):
    fig = _styled(_probe_cases()[case], style)
    assert _legend_outside_plot(fig.layout.legend), fig.layout.legend
    ann = _annotation(fig, "chance")
    bottom, top = _text_rows_px(fig, ann)
    left, right = _text_cols_px(fig, ann)
    chosen = [s.x0 for s in fig.layout.shapes if s.x0 == s.x1][0]
    assert not (left - 2 < _data_x_to_px(fig, chosen) < right + 2), "the chosen-layer line strikes through 'chance'"
    assert top <= _y_to_px(fig, 0.5) + 1  # below its line
    assert tuple(fig.layout.xaxis.range) == pytest.approx((min(t.x[0] for t in fig.data) - 0.5 * _x_step(fig),
                                                           max(t.x[-1] for t in fig.data) + 0.5 * _x_step(fig)))


def _x_step(fig) -> float:
    x = np.asarray(fig.data[0].x, dtype=float)
    return float(np.min(np.diff(x))) if x.size > 1 else 1.0


# ---- 26. neuron ablation: x labels distinct and apart -----------------------------------------------------------


def _neuron_ablation(n_random: int = 3):
    from test_figures import make_neuron_ablation

    from mechcliff.neurons import NeuronAblation

    a = make_neuron_ablation()
    rand = a.conditions[2]
    conds = a.conditions[:2] + [dict(rand, name=f"random {i}") for i in range(n_random)]
    return NeuronAblation(conditions=conds, neurons=a.neurons, model_id="synthetic")


def _check_category_labels(fig: go.Figure, style_name: str) -> None:
    st = STYLES[style_name]
    pw, _ = _plot_px(fig)
    checked = 0
    for t in fig.data:
        if t.type != "bar":
            continue
        ax = fig.layout[(t.xaxis or "x").replace("x", "xaxis", 1)]
        labels = [str(v) for v in t.x]
        assert len(set(labels)) == len(labels), labels  # each condition once
        shown = list(ax.ticktext) if ax.tickvals is not None else labels
        assert len(set(shown)) == len(shown) and set(shown) <= set(labels)
        spacing = pw * (ax.domain[1] - ax.domain[0]) / len(labels) * (len(labels) / len(shown))
        size = float(ax.tickfont.size or st.tick_size)
        widest = max(len(s) for s in shown) * 0.6 * size
        angle = ax.tickangle
        assert angle is not None, "tick angle left to plotly"
        if angle == 0:
            assert widest + 4 <= spacing, (shown, widest, spacing)  # side by side with a gap
        else:
            assert spacing >= 1.2 * size / abs(math.sin(math.radians(angle))), (angle, spacing)  # slanted rows apart
        assert ax.type == "category"  # one tick per condition, never a numeric or date axis guessed from names
        checked += 1
    assert checked == 2


@pytest.mark.unit
@pytest.mark.parametrize("n_random", [1, 3, 6])
def test_neuron_ablation_x_labels_are_distinct_and_apart(n_random):
    fig = _neuron_ablation(n_random).plot()
    _check_category_labels(apply_style(fig, "paper"), "paper")
    _check_category_labels(apply_style(fig, "paper", columns=2), "paper")
    _check_category_labels(fig, "notebook")


# ---- 28. RAS: the Δ misalignment axis fits the data --------------------------------------------------------------


def _ras(rates: list[int], base: int = 0):
    from test_figures import _rate

    from mechcliff.neurons import RASSeries

    def ras(x):
        return {"delta_safe": x, "delta_math": 2 * x, "ras": 4 * x / 3, "n": 2, "n_invalid_safe": 0,
                "n_invalid_math": 0}

    n = len(rates)
    return RASSeries(checkpoints=[f"ft/step-{i}" for i in range(n)], ras=[ras(0.1 * (i + 1)) for i in range(n)],
                     ras_random=[[ras(0.05)] for _ in range(n)], misalignment=[_rate(k, 10, False) for k in rates],
                     base_misalignment=_rate(base, 10, False), kl=[0.01 * (i + 1) for i in range(n)],
                     neurons=["L2N3", "L2N9"], base_model="synthetic")


@pytest.mark.unit
@pytest.mark.parametrize("rates", [[10], [5, 5], [3, 4, 6], [0, 10]])
def test_ras_delta_misalignment_axis_fits_the_data(rates):
    series = _ras(rates)
    dm = np.asarray(series.delta_misalignment)
    for fig in (series.plot(), apply_style(series.plot(), "paper")):
        ax = fig.layout.xaxis  # column 1: Δ misalignment
        assert "misalignment" in ax.title.text
        assert ax.range is not None, "left to plotly's autorange (±1 around a single value)"
        lo, hi = ax.range
        assert lo < dm.min() and hi > dm.max()
        span = dm.max() - dm.min()
        assert hi - lo <= span * 1.25 + 0.25, (ax.range, dm)  # a small pad, not a unit either side
        assert lo >= -1.1 and hi <= 1.1  # a difference of two rates


@pytest.mark.unit
def test_ras_without_a_base_rate_still_plots():
    series = _ras([3, 4])
    series.base_misalignment = {"rate": None, "low": None, "high": None, "n": 0, "k": 0}
    fig = series.plot()
    assert fig.layout.xaxis.range is None  # nothing to fit: plotly's autorange


# ---- 28. spectral.html: B1, B2 and B3 --------------------------------------------------------------------------


def _spectral():
    from test_figures import make_spectral

    return make_spectral()


@pytest.mark.unit
def test_spectral_figures_cover_every_metric():
    from mechcliff.spectral import METRIC_NAMES, METRICS, spectral_figures

    res = _spectral()
    figs = spectral_figures(res)
    assert list(figs) == list(METRICS)
    for m, fig in figs.items():
        hm = fig.data[0]
        assert hm.type == "heatmap" and hm.zmid == 0
        assert METRIC_NAMES[m] in fig.layout.title.text
        np.testing.assert_allclose(np.asarray(hm.z, dtype=float), res.gap(m))
        outline = [t for t in fig.data if t.type == "scatter"]
        assert [list(t.meta) for t in outline] == ([res.key_head_labels(m)] if res.key_head_labels(m) else [])


@pytest.mark.unit
def test_spectral_html_shows_b1_b2_and_b3(tmp_path):
    from mechcliff.spectral import METRIC_NAMES, write_spectral

    res = _spectral()
    path, html = write_spectral(res, str(tmp_path / "out"), "spectral")
    text = html.read_text(encoding="utf-8")
    assert html.name == "spectral.html" and text.lstrip().lower().startswith("<!doctype html")
    assert text.count("Plotly.newPlot(") == 3 and text.count("plotly.js v") == 1
    for m in ("b1", "b2", "b3"):
        assert METRIC_NAMES[m] in text
        for label in res.key_head_labels(m):
            assert label in text
    from mechcliff.results import Result

    assert isinstance(Result.load(path), type(res))


@pytest.mark.organism
def test_cli_spectral_html_shows_every_metric(tmp_path, capsys):
    from mechcliff.cli import main
    from mechcliff.spectral import METRIC_NAMES

    out = tmp_path / "spec"
    rc = main(["spectral", "--model", "organism", "--out", str(out), "--layers", "1-2", "--n-per-group", "2",
               "--max-think-tokens", "8", "--size", "none", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    page = (out / "spectral.html").read_text(encoding="utf-8")
    assert page.count("Plotly.newPlot(") == 3
    assert all(METRIC_NAMES[m] in page for m in ("b1", "b2", "b3"))
