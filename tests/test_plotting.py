"""Structure tests for mechcliff.plotting and mechcliff.report (no rendering, no browser)."""

from __future__ import annotations

import re

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest

from mechcliff.errors import MechcliffError
from mechcliff.plotting import (
    DIVERGING_SCALE,
    OKABE_ITO,
    TEMPLATE,
    TEMPLATE_NAME,
    asr_bars,
    cliff_curves,
    cliff_histogram,
    figure_to_html,
    layer_head_heatmap,
    probe_by_layer,
)
from mechcliff.report import CONTENT_WARNING, html_table, write_report

pytestmark = pytest.mark.unit

BUNDLE_MARKER = "plotly.js v"  # from the licence header at the top of the embedded bundle


def _heatmap_values() -> np.ndarray:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(4, 6))
    values[1, 2] = -5.0  # largest magnitude is negative: range must still be symmetric
    return values


def _curves() -> dict[str, dict[str, np.ndarray]]:
    x = np.arange(-5, 6, dtype=float)
    mean = np.linspace(0.9, 0.1, x.size)
    mean[3] = np.nan  # no example contributes here
    n = np.full(x.size, 10.0)
    n[3] = 0
    return {
        "refused": {"x": x, "mean": mean, "low": mean - 0.05, "high": mean + 0.05, "n": n},
        "complied": {"x": x, "mean": 1 - np.nan_to_num(mean), "low": 0.8 - mean * 0, "high": 0.95 + mean * 0, "n": n},
    }


def _shape_xs(fig: go.Figure) -> list[float]:
    return [s.x0 for s in fig.layout.shapes if s.x0 == s.x1]


# ------------------------------------------------------------------ style


def test_template_registered_and_colour_blind_palette() -> None:
    assert pio.templates[TEMPLATE_NAME].to_plotly_json() == TEMPLATE.to_plotly_json()
    assert list(TEMPLATE.layout.colorway) == list(OKABE_ITO)
    assert DIVERGING_SCALE == "RdBu_r"


# ------------------------------------------------------------------ heatmap


def test_heatmap_structure() -> None:
    values = _heatmap_values()
    fig = layer_head_heatmap(values, highlight=[(2, 3), (0, 5)])
    heat = fig.data[0]
    assert isinstance(heat, go.Heatmap)
    assert np.asarray(heat.z).shape == (4, 6)
    assert heat.zmid == 0
    assert heat.zmin == -heat.zmax == pytest.approx(-5.0)
    # hover labels: customdata holds "L{layer}H{head}" and the template shows it and the value
    custom = np.asarray(heat.customdata)
    assert custom.shape == (4, 6)
    assert custom[2][3] == "L2H3"
    assert "%{customdata}" in heat.hovertemplate and "%{z" in heat.hovertemplate
    assert fig.layout.yaxis.autorange == "reversed"
    assert fig.layout.xaxis.title.text == "head"
    assert fig.layout.yaxis.title.text == "layer"
    assert heat.colorbar.title.text == "contribution to probe logit"
    # highlight: one extra trace with a legend entry outlining exactly the (2, 3) cell
    assert len(fig.data) == 2
    hl = fig.data[1]
    assert hl.name == "planted" and hl.showlegend
    xs = [v for v in hl.x if v is not None]
    ys = [v for v in hl.y if v is not None]
    assert min(xs[:5]) == 2.5 and max(xs[:5]) == 3.5  # head 3
    assert min(ys[:5]) == 1.5 and max(ys[:5]) == 2.5  # layer 2
    assert set(hl.meta) == {"L2H3", "L0H5"}


def test_heatmap_without_highlight_and_bad_input() -> None:
    fig = layer_head_heatmap(np.zeros((2, 3)))
    assert len(fig.data) == 1
    assert fig.data[0].zmin == -fig.data[0].zmax  # all-zero input still gets a valid symmetric range
    with pytest.raises(MechcliffError):
        layer_head_heatmap(np.zeros(5))
    with pytest.raises(MechcliffError):
        layer_head_heatmap(np.zeros((2, 3)), highlight=[(2, 0)])


# ------------------------------------------------------------------ cliff curves


def test_cliff_curves_structure() -> None:
    curves = _curves()
    fig = cliff_curves(curves)
    assert len(fig.data) == 2 * len(curves)  # band + line per group
    bands, lines = fig.data[0::2], fig.data[1::2]
    assert all(b.fill == "toself" for b in bands)
    assert [line.name for line in lines] == ["refused", "complied"]
    for band, line in zip(bands, lines):
        assert band.line.color == line.line.color
        assert band.fillcolor.startswith("rgba(")
        assert band.legendgroup == line.legendgroup
    y = np.asarray(lines[0].y, dtype=float)
    assert np.isnan(y[3])  # gap kept, not replaced by 0
    assert np.allclose(np.delete(y, 3), np.delete(curves["refused"]["mean"], 3))
    assert lines[0].connectgaps is False
    # band is split at the gap into two closed polygons
    assert sum(v is None for v in bands[0].x) == 2
    assert 0 in _shape_xs(fig)
    assert fig.layout.shapes[0].line.dash == "dash"
    assert any("think" in a.text for a in fig.layout.annotations)
    assert tuple(fig.layout.yaxis.range) == (0, 1)
    assert "think" in fig.layout.xaxis.title.text


def test_cliff_curves_bad_input() -> None:
    with pytest.raises(MechcliffError):
        cliff_curves({})
    with pytest.raises(MechcliffError):
        cliff_curves({"g": {"x": [0, 1], "mean": [0.5], "low": [0.4], "high": [0.6], "n": [3]}})
    with pytest.raises(MechcliffError):
        cliff_curves({"g": {"x": [0, 1], "mean": [0.5, 0.5]}})


# ------------------------------------------------------------------ probe by layer


def test_probe_by_layer_structure() -> None:
    fig = probe_by_layer([0, 4, 8, 12], [0.6, 0.8, 0.9, 0.85], [0.65, 0.85, 0.95, 0.9], chosen_layer=8)
    assert len(fig.data) == 2
    assert {t.name for t in fig.data} == {"held-out accuracy", "AUROC"}
    assert 8 in _shape_xs(fig)
    assert any("chosen" in a.text for a in fig.layout.annotations)
    assert tuple(fig.layout.yaxis.range) == (0.4, 1.14)  # headroom above 1 for the chosen-layer note
    assert max(fig.layout.yaxis.tickvals) == 1.0
    assert 8 not in _shape_xs(probe_by_layer([0, 8], [0.5, 0.6], [0.5, 0.6]))
    with pytest.raises(MechcliffError):
        probe_by_layer([0, 8], [0.5, 0.6], [0.5, 0.6], chosen_layer=3)


# ------------------------------------------------------------------ ASR bars


def test_asr_bars_error_bars() -> None:
    rates = [0.2, 0.5, 0.0]
    lows = [0.1, 0.3, 0.0]
    highs = [0.35, 0.6, 0.15]
    fig = asr_bars(["baseline", "ablate heads", "steer"], rates, lows, highs)
    bar = fig.data[0]
    assert isinstance(bar, go.Bar)
    assert bar.error_y.symmetric is False
    np.testing.assert_allclose(bar.error_y.array, np.subtract(highs, rates))
    np.testing.assert_allclose(bar.error_y.arrayminus, np.subtract(rates, lows))
    assert tuple(fig.layout.yaxis.range) == (0, 1)
    assert list(bar.text) == ["20%", "50%", "0%"]
    assert [a.text for a in fig.layout.annotations] == ["20%", "50%", "0%"]
    with pytest.raises(MechcliffError):
        asr_bars(["a"], [0.5], [0.6], [0.7])  # low above rate
    with pytest.raises(MechcliffError):
        asr_bars(["a", "b"], [0.5], [0.4], [0.7])


# ------------------------------------------------------------------ histogram


def test_cliff_histogram() -> None:
    fig = cliff_histogram({"refused": np.array([0.1, 0.2, np.nan]), "complied": np.array([0.5, 0.9])})
    assert len(fig.data) == 2
    assert all(isinstance(t, go.Histogram) for t in fig.data)
    assert fig.layout.barmode == "group"  # side by side: no blended colour (issue 16, see test_figure_layout.py)
    assert fig.data[0].name == "refused (n=2)"
    assert fig.data[0].xbins.size == fig.data[1].xbins.size  # shared bins
    with pytest.raises(MechcliffError):
        cliff_histogram({"g": np.array([np.nan])})


# ------------------------------------------------------------------ HTML


def test_figure_to_html_fragment() -> None:
    frag = figure_to_html(probe_by_layer([0, 1], [0.5, 0.6], [0.5, 0.7]), include_plotlyjs=False)
    assert frag.lstrip().startswith("<div")
    assert "<html" not in frag and BUNDLE_MARKER not in frag


def test_html_table_escapes_and_formats() -> None:
    table = html_table(["name", "<score>"], [["<script>alert(1)</script>", 0.123456], ["a&b", float("nan")], ["n", 7]])
    assert "<script>" not in table
    assert "&lt;script&gt;" in table and "&lt;score&gt;" in table and "a&amp;b" in table
    assert "0.123" in table and "0.1234" not in table
    assert "n/a" in table and ">7<" in table
    with pytest.raises(MechcliffError):
        html_table(["a", "b"], [[1]])


def test_write_report_self_contained(tmp_path) -> None:
    out = tmp_path / "sub" / "report.html"
    sections = [
        ("Probe by layer", probe_by_layer([0, 1, 2], [0.5, 0.7, 0.8], [0.55, 0.75, 0.9], chosen_layer=2)),
        ("Heads <attribution>", layer_head_heatmap(_heatmap_values(), highlight=[(1, 1)])),
        ("Examples", html_table(["prompt", "score"], [["how do I <x>?", 0.5]])),
        ("Cliff", cliff_curves(_curves())),
    ]
    write_report(
        out,
        title="Refusal cliff report",
        summary_rows=[("model", "tiny-test"), ("examples", "12")],
        sections=sections,
        notes=["Wilson 95% intervals."],
    )
    assert out.exists()
    assert not [p for p in out.parent.iterdir() if p.name != "report.html"]  # temp file cleaned up
    text = out.read_text(encoding="utf-8")
    assert CONTENT_WARNING in text
    assert text.index(CONTENT_WARNING) < text.index("<h1>")
    assert "<h1>Refusal cliff report</h1>" in text
    for heading in ("Probe by layer", "Heads &lt;attribution&gt;", "Examples", "Cliff"):
        assert f">{heading}</h2>" in text
    assert "tiny-test" in text and "Wilson 95% intervals." in text
    assert "&lt;x&gt;" in text

    # plotly.js embedded exactly once, before the first figure call
    assert text.count(BUNDLE_MARKER) == 1
    assert text.count("Plotly.newPlot(") == 3
    start = text.index(BUNDLE_MARKER)
    assert start < text.index("Plotly.newPlot(")
    # outside the embedded bundle there is no network reference at all
    end = text.index("</script>", start)
    outside = text[:start] + text[end:]
    assert "cdn.plot.ly" not in outside
    assert not re.search(r"https?://", outside)
    assert not re.search(r"<script[^>]*\bsrc=", text)
    assert '<script src="http' not in text

    # rewriting replaces the file atomically
    write_report(out, title="Again", summary_rows=[], sections=[("Only", "<p>hi</p>")])
    again = out.read_text(encoding="utf-8")
    assert "<h1>Again</h1>" in again and BUNDLE_MARKER not in again
