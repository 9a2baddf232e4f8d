"""Plotly figures for mechcliff reports.

Every function takes numpy / plain Python inputs and returns a
``plotly.graph_objects.Figure``; nothing here calls ``show()`` or writes files.
All figures share one look, :data:`TEMPLATE` (registered in ``plotly.io.templates``
as ``"mechcliff"``): a white background, the colour-blind-safe Okabe-Ito palette for
categories and the diverging ``"RdBu_r"`` scale, centred at zero, for signed attributions.

How figures look is defined in one place, :data:`STYLES` (a :class:`Style` per name): ``"notebook"`` (the
template's fonts, for Jupyter and the HTML report) and ``"paper"`` (8 pt text, 7 pt ticks, one column = 3.5 in,
two columns = 7.2 in, for PDF / SVG / PNG files). :func:`apply_style` restyles any figure, including those made
by result classes' ``plot()``; :mod:`mechcliff.figures` uses it to export a run folder's figures.

Text passed in (titles, group names) is shown literally: ``<`` and ``>`` are escaped,
so a label such as ``"</think>"`` is displayed rather than parsed as markup.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

from mechcliff.errors import MechcliffError

__all__ = [
    "DIVERGING_SCALE",
    "OKABE_ITO",
    "PX_PER_INCH",
    "SEQUENTIAL_SCALE",
    "STYLES",
    "Style",
    "TEMPLATE",
    "TEMPLATE_NAME",
    "apply_style",
    "asr_bars",
    "cliff_curves",
    "cliff_histogram",
    "figure_to_html",
    "fit_category_ticks",
    "get_style",
    "layer_head_heatmap",
    "probe_by_layer",
]

# --------------------------------------------------------------------------- style

#: Okabe-Ito palette (Okabe & Ito 2008), ordered so the first colours contrast best on white.
OKABE_ITO: tuple[str, ...] = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#E69F00",  # orange
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#000000",  # black
    "#F0E442",  # yellow (low contrast on white: last)
)

#: Diverging colour scale for signed attributions; always used with a symmetric range around 0.
DIVERGING_SCALE = "RdBu_r"

#: Sequential colour scale for non-negative per-head quantities (e.g. Ships KL); perceptually uniform.
SEQUENTIAL_SCALE = "Viridis"

#: Name under which :data:`TEMPLATE` is registered in ``plotly.io.templates``.
TEMPLATE_NAME = "mechcliff"

_GRID = "#e5e5e5"
#: Top margin (px, notebook look) that holds the title and one legend row above the plot, apart.
_TOP_WITH_LEGEND = 100
#: Top of the probe-by-layer score axis: headroom above 1 (the last tick) for the chosen-layer note.
_PROBE_Y_TOP = 1.14
_OUTLINE = "#000000"
_REFERENCE_LINE = "#555555"

#: CSS pixels per inch: plotly lays figures out in CSS pixels and kaleido's PDF / SVG use 1 px = 1/96 in = 0.75 pt.
PX_PER_INCH = 96


@dataclass(frozen=True)
class Style:
    """Everything that decides how a mechcliff figure looks: the one place to change fonts, sizes and colours.

    Sizes are CSS pixels (``PX_PER_INCH`` px = 1 inch; in PDF and SVG 1 px = 0.75 pt). :func:`apply_style`
    applies a style to any figure; :data:`TEMPLATE` is built from the ``"notebook"`` style.
    """

    name: str
    font_family: str
    font_size: float  # axis titles, legend, colour-bar titles
    title_size: float
    tick_size: float  # tick labels and annotations
    one_column: int  # figure width (px) for one column of a two-column paper
    two_column: int  # figure width (px) across both columns
    aspect: float  # height / width of line and bar figures
    margin: tuple[int, int, int, int]  # left, right, top, bottom (px), before automatic growth
    line_scale: float  # multiplies line widths set by the figure functions
    marker_scale: float
    colorbar_thickness: int
    png_scale: float  # PNG pixels per layout pixel (3.125 = 300 dpi)
    show_axis_lines: bool
    legend_on_top: bool  # several legend entries: one horizontal legend above the plot, never over the data
    colorway: tuple[str, ...] = OKABE_ITO
    diverging: str = DIVERGING_SCALE
    sequential: str = SEQUENTIAL_SCALE
    text_color: str = "#222222"
    grid_color: str = _GRID

    def width(self, columns: int) -> int:
        return self.one_column if columns == 1 else self.two_column

    @property
    def font(self) -> dict[str, Any]:
        return dict(family=self.font_family, size=self.font_size, color=self.text_color)


#: The figure styles: ``"paper"`` for PDF / SVG / PNG files that go into a two-column paper (8 pt text, 7 pt ticks,
#: 3.5 in or 7.2 in wide, Arial / Liberation Sans), ``"notebook"`` for Jupyter and the HTML report.
STYLES: dict[str, Style] = {
    "paper": Style(
        name="paper", font_family="Arial, 'Liberation Sans', Helvetica, sans-serif",
        font_size=8 / 0.75, title_size=9 / 0.75, tick_size=7 / 0.75,
        one_column=int(3.5 * PX_PER_INCH), two_column=int(7.2 * PX_PER_INCH), aspect=0.72,
        margin=(46, 8, 28, 36), line_scale=0.7, marker_scale=0.75, colorbar_thickness=10,
        png_scale=300 / PX_PER_INCH, show_axis_lines=True, legend_on_top=True,
    ),
    "notebook": Style(
        name="notebook", font_family="Inter, 'Helvetica Neue', Arial, sans-serif",
        font_size=13, title_size=17, tick_size=12,
        one_column=640, two_column=960, aspect=0.65,
        margin=(70, 30, 80, 60), line_scale=1.0, marker_scale=1.0, colorbar_thickness=20,
        png_scale=2.0, show_axis_lines=False, legend_on_top=False,
    ),
}

_FONT_FAMILY = STYLES["notebook"].font_family


def get_style(style: "str | Style") -> Style:
    """A :class:`Style` by name (``"paper"``, ``"notebook"``), or the style itself."""
    if isinstance(style, Style):
        return style
    try:
        return STYLES[str(style)]
    except KeyError:
        raise MechcliffError(f"unknown style {style!r}; styles: {', '.join(STYLES)}") from None


def _build_template() -> go.layout.Template:
    """The shared layout template: plotly_white plus the colours and fonts of the ``"notebook"`` style."""
    st = STYLES["notebook"]
    template = go.layout.Template(pio.templates["plotly_white"])
    template.layout.update(
        colorway=list(st.colorway),
        font=st.font,
        title=dict(x=0.0, xanchor="left", font=dict(size=st.title_size)),
        colorscale=dict(diverging=st.diverging, sequential=st.sequential),
        hoverlabel=dict(font=dict(family=st.font_family)),
        legend=dict(bgcolor="rgba(255,255,255,0.8)"),
        margin=dict(zip("lrtb", st.margin)),
        xaxis=dict(gridcolor=st.grid_color, zeroline=False, ticks="outside"),
        yaxis=dict(gridcolor=st.grid_color, zeroline=False, ticks="outside"),
    )
    return template


#: The mechcliff plotly template (also available as ``template="mechcliff"``).
TEMPLATE: go.layout.Template = _build_template()
pio.templates[TEMPLATE_NAME] = TEMPLATE


def _text(s: object) -> str:
    """Escape text for plotly labels (plotly renders a subset of HTML and decodes entities)."""
    return html.escape(str(s), quote=False)


def _legend_above(fig: go.Figure, title: str, *, height: int, hovermode: str) -> None:
    """Layout of the line charts: the legend in one row above the plot (the curves span the whole x range, so a
    legend inside would cover a band of them), with the top margin it needs."""
    fig.update_layout(template=TEMPLATE, title=dict(text=_text(title)), height=height, hovermode=hovermode,
                      legend=dict(orientation="h", x=0.0, xanchor="left", y=1.02, yanchor="bottom"),
                      margin=dict(t=_TOP_WITH_LEGEND))


def _color(i: int) -> str:
    return OKABE_ITO[i % len(OKABE_ITO)]


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[k : k + 2], 16) for k in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _float_array(values: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise MechcliffError(f"{name} must be numeric, got {type(values).__name__}: {exc}") from exc
    return arr


# --------------------------------------------------------------------------- heatmap


def layer_head_heatmap(
    values: np.ndarray,
    *,
    title: str = "Direct probe attribution",
    colorbar_title: str = "contribution to probe logit",
    highlight: list[tuple[int, int]] | None = None,
    highlight_name: str = "planted",
    signed: bool = True,
) -> go.Figure:
    """Heatmap of a per-head quantity, shape ``[n_layers, n_heads]``.

    Layers run down the y axis (layer 0 at the top), heads along x. Signed quantities
    (``signed=True``, e.g. attributions) use the diverging scale with a colour range
    symmetric around zero; non-negative ones (``signed=False``, e.g. KL) use the sequential
    scale from 0. Cells listed in ``highlight`` as ``(layer, head)`` are outlined and get a
    legend entry called ``highlight_name``.
    """
    z = _float_array(values, "values")
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] == 0:
        raise MechcliffError(f"values must be a non-empty 2-D array [n_layers, n_heads], got shape {z.shape}")
    n_layers, n_heads = z.shape

    finite = np.abs(z[np.isfinite(z)])
    m = float(finite.max()) if finite.size else 0.0
    if m == 0.0:
        m = 1.0  # all zero / all NaN: any symmetric range will do

    labels = np.array([[f"L{layer}H{head}" for head in range(n_heads)] for layer in range(n_layers)], dtype=object)
    heatmap = go.Heatmap(
        z=z,
        x=list(range(n_heads)),
        y=list(range(n_layers)),
        customdata=labels,
        colorscale=DIVERGING_SCALE if signed else SEQUENTIAL_SCALE,
        zmin=-m if signed else min(0.0, float(np.nanmin(z)) if np.isfinite(z).any() else 0.0),
        zmax=m,
        zmid=0.0 if signed else None,
        xgap=1,
        ygap=1,
        colorbar=dict(title=dict(text=_text(colorbar_title), side="right")),
        hovertemplate="<b>%{customdata}</b><br>layer %{y}, head %{x}<br>value %{z:.4g}<extra></extra>",
        name=_text(title),
        showscale=True,
    )
    fig = go.Figure(heatmap)

    if highlight:
        xs: list[float | None] = []
        ys: list[float | None] = []
        seen: set[tuple[int, int]] = set()
        for cell in highlight:
            try:
                layer, head = (int(c) for c in cell)
            except (TypeError, ValueError) as exc:
                raise MechcliffError(f"highlight entries must be (layer, head) pairs of ints, got {cell!r}") from exc
            if not (0 <= layer < n_layers and 0 <= head < n_heads):
                raise MechcliffError(
                    f"highlight cell (layer={layer}, head={head}) is outside the {n_layers}x{n_heads} grid"
                )
            if (layer, head) in seen:
                continue
            seen.add((layer, head))
            x0, x1, y0, y1 = head - 0.5, head + 0.5, layer - 0.5, layer + 0.5
            xs += [x0, x1, x1, x0, x0, None]
            ys += [y0, y0, y1, y1, y0, None]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                line=dict(color=_OUTLINE, width=2.5),
                name=_text(highlight_name),
                showlegend=True,
                hoverinfo="skip",
                meta=[f"L{layer}H{head}" for layer, head in sorted(seen)],
            )
        )

    fig.update_layout(
        template=TEMPLATE,
        title=dict(text=_text(title)),
        height=int(min(1400, max(420, 22 * n_layers + 170))),
        legend=dict(orientation="h", x=1.0, xanchor="right", y=1.02, yanchor="bottom"),
        plot_bgcolor="#ffffff",
    )
    fig.update_xaxes(
        title_text="head",
        showgrid=False,
        range=[-0.5, n_heads - 0.5],
        dtick=1 if n_heads <= 32 else None,
        ticks="",
    )
    fig.update_yaxes(
        title_text="layer",
        showgrid=False,
        autorange="reversed",
        dtick=1 if n_layers <= 48 else None,
        ticks="",
    )
    return fig


# --------------------------------------------------------------------------- cliff curves


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` index ranges of consecutive True values."""
    runs: list[tuple[int, int]] = []
    start: int | None = None
    for i, ok in enumerate(mask):
        if ok and start is None:
            start = i
        elif not ok and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(mask)))
    return runs


def _band_polygon(x: np.ndarray, low: np.ndarray, high: np.ndarray) -> tuple[list[float | None], list[float | None]]:
    """Closed outline of the low..high band, one polygon per gap-free run, separated by None."""
    ok = np.isfinite(x) & np.isfinite(low) & np.isfinite(high)
    bx: list[float | None] = []
    by: list[float | None] = []
    for start, stop in _runs(ok):
        xs = x[start:stop].tolist()
        bx += xs + xs[::-1] + [xs[0], None]
        by += high[start:stop].tolist() + low[start:stop][::-1].tolist() + [float(high[start]), None]
    return bx, by


def cliff_curves(
    curves: Mapping[str, Mapping[str, Any]],
    *,
    title: str = "Refusal intention around the end of thinking",
    x_title: str = "tokens relative to </think>",
    y_title: str = "probe refusal score",
    marker_x: float | None = 0.0,
) -> go.Figure:
    """Mean probe score against token position relative to ``</think>``, one line per group.

    ``marker_x`` is where the dashed ``</think>`` line goes (``None``: no line).

    Each value of ``curves`` is ``{"x", "mean", "low", "high", "n"}`` (equal-length arrays,
    ``n`` = examples contributing at each x). NaNs are kept and drawn as gaps. The low..high
    interval is a translucent band in the line's colour; trace order is band, line per group.
    """
    if not curves:
        raise MechcliffError("cliff_curves needs at least one group")
    fig = go.Figure()
    for i, (group, curve) in enumerate(curves.items()):
        missing = [k for k in ("x", "mean", "low", "high", "n") if k not in curve]
        if missing:
            raise MechcliffError(f"curve {group!r} is missing key(s) {missing}; expected x, mean, low, high, n")
        x = _float_array(curve["x"], f"{group}.x")
        arrays = {k: _float_array(curve[k], f"{group}.{k}") for k in ("mean", "low", "high", "n")}
        for k, arr in arrays.items():
            if arr.ndim != 1 or arr.shape != x.shape:
                raise MechcliffError(
                    f"curve {group!r}: {k} has shape {arr.shape} but x has shape {x.shape}; they must match"
                )
        mean, low, high, n = arrays["mean"], arrays["low"], arrays["high"], arrays["n"]
        color = _color(i)
        name = _text(group)
        bx, by = _band_polygon(x, low, high)
        fig.add_trace(
            go.Scatter(
                x=bx,
                y=by,
                mode="lines",
                fill="toself",
                fillcolor=_rgba(color, 0.2),
                line=dict(width=0, color=color),
                name=f"{name} interval",
                legendgroup=name,
                showlegend=False,
                hoverinfo="skip",
                connectgaps=False,
            )
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=mean,
                mode="lines",
                line=dict(color=color, width=2.2),
                name=name,
                legendgroup=name,
                connectgaps=False,
                customdata=np.column_stack([low, high, np.nan_to_num(n)]),
                hovertemplate=(
                    "x=%{x}<br>mean %{y:.3f}<br>interval [%{customdata[0]:.3f}, %{customdata[1]:.3f}]"
                    "<br>n=%{customdata[2]:.0f}"
                ),
            )
        )
    if marker_x is not None:
        fig.add_vline(
            x=marker_x,
            line=dict(dash="dash", color=_REFERENCE_LINE, width=1.5),
            annotation=dict(text="&lt;/think&gt;", font=dict(color=_REFERENCE_LINE)),
            annotation_position="top left" if marker_x > 0 else "top right",
        )
    _legend_above(fig, title, height=480, hovermode="closest")
    fig.update_xaxes(title_text=_text(x_title))
    fig.update_yaxes(title_text=_text(y_title), range=[0.0, 1.0])
    return fig


# --------------------------------------------------------------------------- probe sweep


def probe_by_layer(
    layers: Sequence[int],
    accuracy: Sequence[float],
    auroc: Sequence[float],
    *,
    chosen_layer: int | None = None,
    title: str = "Refusal probe quality by layer",
) -> go.Figure:
    """Held-out accuracy and AUROC of the refusal probe against layer; ``chosen_layer`` is marked."""
    x = _float_array(layers, "layers")
    acc = _float_array(accuracy, "accuracy")
    auc = _float_array(auroc, "auroc")
    if x.ndim != 1 or x.size == 0:
        raise MechcliffError("layers must be a non-empty 1-D sequence")
    if acc.shape != x.shape or auc.shape != x.shape:
        raise MechcliffError(
            f"layers, accuracy and auroc must have the same length, got {x.size}, {acc.size}, {auc.size}"
        )
    fig = go.Figure()
    for k, (name, y) in enumerate((("held-out accuracy", acc), ("AUROC", auc))):
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                mode="lines+markers",
                name=name,
                line=dict(color=_color(k), width=2, dash="solid" if k == 0 else "dot"),
                marker=dict(size=6, symbol="circle" if k == 0 else "diamond"),
                hovertemplate="layer %{x}<br>" + name + " %{y:.3f}<extra></extra>",
            )
        )
    step = float(np.min(np.diff(np.unique(x)))) if np.unique(x).size > 1 else 1.0
    x_range = [float(x.min()) - step / 2, float(x.max()) + step / 2]
    # text goes on the side of the plot away from the chosen-layer line, so no line runs through it
    chosen_right = chosen_layer is not None and int(chosen_layer) > (x_range[0] + x_range[1]) / 2
    fig.add_hline(
        y=0.5,
        line=dict(dash="dot", color="#999999", width=1),
        annotation=dict(text="chance", font=dict(color="#999999", size=11)),
        annotation_position="bottom left" if chosen_right else "bottom right",
    )
    if chosen_layer is not None:
        if int(chosen_layer) not in {int(v) for v in x}:
            raise MechcliffError(f"chosen_layer={chosen_layer} is not one of the plotted layers")
        # the note sits in the headroom above score 1 (the axis runs to _PROBE_Y_TOP, its last tick and gridline
        # are at 1), beside its line: no data, gridline or reference line runs through it
        fig.add_vline(
            x=int(chosen_layer),
            line=dict(dash="dash", color=_REFERENCE_LINE, width=1.5),
            annotation=dict(text=f"chosen layer {int(chosen_layer)}", font=dict(color=_REFERENCE_LINE)),
            annotation_position="top left" if chosen_right else "top right",
            name="chosen layer",
        )
    _legend_above(fig, title, height=440, hovermode="x unified")
    fig.update_xaxes(title_text="layer", dtick=1 if x.size <= 40 else None, range=x_range)
    fig.update_yaxes(title_text="score", range=[0.4, _PROBE_Y_TOP], tickmode="array",
                     tickvals=[round(0.4 + 0.1 * k, 1) for k in range(7)])
    return fig


# --------------------------------------------------------------------------- ASR bars


def asr_bars(
    conditions: Sequence[str],
    rates: Sequence[float],
    lows: Sequence[float],
    highs: Sequence[float],
    *,
    title: str = "Attack success rate",
    y_title: str = "ASR (jailbreak prompts)",
) -> go.Figure:
    """Bar chart of attack success rates with asymmetric (e.g. Wilson) interval error bars.

    The percentage is written on each bar (labels sit above the error bar).
    """
    r = _float_array(rates, "rates")
    lo = _float_array(lows, "lows")
    hi = _float_array(highs, "highs")
    names = [str(c) for c in conditions]
    if not names:
        raise MechcliffError("asr_bars needs at least one condition")
    if not (r.shape == lo.shape == hi.shape == (len(names),)):
        raise MechcliffError(
            f"conditions, rates, lows and highs must have the same length, got "
            f"{len(names)}, {r.size}, {lo.size}, {hi.size}"
        )
    if not (np.isfinite(r).all() and np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise MechcliffError("rates, lows and highs must be finite numbers")
    eps = 1e-9
    bad = [
        names[i]
        for i in range(len(names))
        if not (-eps <= lo[i] <= r[i] + eps and r[i] <= hi[i] + eps and hi[i] <= 1 + eps)
    ]
    if bad:
        raise MechcliffError(f"need 0 <= low <= rate <= high <= 1 for every condition; violated for {bad}")

    labels = [f"{v:.0%}" for v in r]
    fig = go.Figure(
        go.Bar(
            x=[_text(n) for n in names],
            y=r,
            marker=dict(color=[_color(i) for i in range(len(names))]),
            error_y=dict(
                type="data",
                symmetric=False,
                array=np.clip(hi - r, 0.0, None),
                arrayminus=np.clip(r - lo, 0.0, None),
                color="#333333",
                thickness=1.5,
                width=6,
            ),
            text=labels,
            textposition="none",
            customdata=np.column_stack([lo, hi]),
            hovertemplate="%{x}<br>ASR %{y:.1%}<br>interval [%{customdata[0]:.1%}, %{customdata[1]:.1%}]<extra></extra>",
            name="ASR",
            showlegend=False,
        )
    )
    for name, label, top in zip(fig.data[0].x, labels, hi):
        fig.add_annotation(
            x=name, y=float(top), text=label, showarrow=False, yanchor="bottom", yshift=4, font=dict(size=12)
        )
    fig.update_layout(template=TEMPLATE, title=dict(text=_text(title)), height=420, bargap=0.35, margin=dict(t=100))
    fig.update_xaxes(title_text="condition", type="category")
    fig.update_yaxes(title_text=_text(y_title), range=[0.0, 1.0], tickformat=".0%")
    return fig


# --------------------------------------------------------------------------- MS histogram


def cliff_histogram(
    ms_by_group: Mapping[str, np.ndarray],
    *,
    title: str = "Misalignment score by group",
    x_title: str = "misalignment score (MS)",
    n_bins: int = 30,
) -> go.Figure:
    """Histograms (fraction of examples) of the misalignment score per group, on shared bins, bars side by side.

    Bins are about ``n_bins`` across the data, of a round width, with edges on multiples of it (so MS = 0 is an
    edge). The x axis always shows MS = 0 (no drop at the end of thinking), with a tick there, and reaches half a
    bin beyond the outermost bars, so none is clipped. Bars of different groups never overlap (``barmode="group"``,
    opaque): every colour on the plot is one the legend names.
    """
    if not ms_by_group:
        raise MechcliffError("cliff_histogram needs at least one group")
    if n_bins < 1:
        raise MechcliffError(f"n_bins must be >= 1, got {n_bins}")
    data = {}
    for group, values in ms_by_group.items():
        arr = _float_array(values, f"ms_by_group[{group!r}]").ravel()
        data[group] = arr[np.isfinite(arr)]
    pooled = np.concatenate(list(data.values()))
    if pooled.size == 0:
        raise MechcliffError("cliff_histogram: no finite misalignment scores in any group")
    lo, hi = float(pooled.min()), float(pooled.max())
    if math.isclose(lo, hi):
        lo, hi = lo - 0.5, hi + 0.5
    size = _nice_step((hi - lo) / n_bins, below=True)
    k0 = math.floor(lo / size + 1e-9)
    k1 = math.floor(hi / size + 1e-9) + 1  # the bin [k1 - 1, k1) * size holds the maximum
    start, end = k0 * size, k1 * size
    xbins = dict(start=start, end=end, size=size)
    x_range = [min(start, 0.0) - size / 2, max(end, 0.0) + size / 2]
    dtick = _tick_step(x_range, max_ticks=8)

    fig = go.Figure()
    for i, (group, arr) in enumerate(data.items()):
        fig.add_trace(
            go.Histogram(
                x=arr,
                name=f"{_text(group)} (n={arr.size})",
                xbins=xbins,
                autobinx=False,
                histnorm="probability",
                marker=dict(color=_color(i), line=dict(width=0)),
                hovertemplate="MS %{x}<br>fraction %{y:.3f}<extra>%{fullData.name}</extra>",
            )
        )
    fig.update_layout(template=TEMPLATE, title=dict(text=_text(title)), barmode="group", bargap=0.1,
                      bargroupgap=0.0, height=420)
    fig.update_xaxes(title_text=_text(x_title), range=x_range, tickmode="linear", tick0=0.0, dtick=dtick)
    fig.update_yaxes(title_text="fraction of examples")
    return fig


def _nice_step(raw: float, *, below: bool = False) -> float:
    """A round step (1, 2, 2.5 or 5 times a power of ten): the smallest at least ``raw`` (``below``: the largest
    at most ``raw``)."""
    if not raw > 0 or not math.isfinite(raw):
        return 1.0
    exp = math.floor(math.log10(raw))
    steps = [m * 10.0 ** e for e in (exp - 1, exp, exp + 1) for m in (1.0, 2.0, 2.5, 5.0)]
    if below:
        return max(v for v in steps if v <= raw * (1 + 1e-9))
    return min(v for v in steps if v >= raw * (1 - 1e-9))


def _tick_step(axis_range: Sequence[float], max_ticks: int) -> float:
    """The smallest round tick step that puts at most ``max_ticks`` ticks (multiples of it) in ``axis_range``."""
    lo, hi = sorted(float(v) for v in axis_range)
    step = _nice_step((hi - lo) / max_ticks)
    while math.floor(hi / step + 1e-9) - math.ceil(lo / step - 1e-9) + 1 > max_ticks:
        step = _nice_step(step * 1.01)
    return step


# --------------------------------------------------------------------------- HTML export


def figure_to_html(fig: go.Figure, *, include_plotlyjs: bool | str, div_id: str | None = None) -> str:
    """Return ``fig`` as an HTML ``<div>`` fragment (``fig.to_html(full_html=False, ...)``).

    ``include_plotlyjs=True`` embeds the whole plotly.js bundle inline; ``False`` assumes it is
    already on the page. The div height follows ``fig.layout.height`` (450 px if unset).
    """
    height = fig.layout.height
    return fig.to_html(
        full_html=False,
        include_plotlyjs=include_plotlyjs,
        include_mathjax=False,
        config={"displaylogo": False, "responsive": True},
        default_width="100%",
        default_height=f"{int(height)}px" if height else "450px",
        div_id=div_id,
    )


# --------------------------------------------------------------------------- styles: paper / notebook


def _wrap_title(text: str, max_px: float, size: float) -> str:
    """Break a title at spaces so that each line fits ``max_px`` (average glyph width ~0.52 em)."""
    import textwrap

    per_line = max(12, int(max_px / (0.52 * size)))
    lines: list[str] = []
    for part in str(text).split("<br>"):
        lines += textwrap.wrap(part, per_line, break_long_words=False, break_on_hyphens=False) or [""]
    return "<br>".join(lines)


def _categories(values: Any) -> list[str] | None:
    """The category labels of a trace's x or y values, or None when the values are numeric."""
    if values is None:
        return None
    vals = list(values)
    if not vals or all(isinstance(v, (int, float, np.integer, np.floating)) or v is None for v in vals):
        return None
    return [str(v) for v in vals]


def _label_px(labels: Sequence[str], size: float) -> float:
    """Approximate width in px of the longest label (average glyph width ~0.6 em)."""
    return max((len(html.unescape(s)) for s in labels), default=1) * 0.6 * size


def _in_legend(trace: Any) -> bool:
    """Whether plotly lists ``trace`` in the legend (heatmaps only when asked to)."""
    if not trace.name or trace.showlegend is False:
        return False
    return trace.showlegend is True or trace.type not in ("heatmap", "contour", "histogram2d", "surface")


def _legend_entries(fig: go.Figure) -> int:
    return len({t.legendgroup or t.name for t in fig.data if _in_legend(t)})


def _heatmap_shape(trace: Any) -> tuple[int, int]:
    z = np.asarray(trace.z, dtype=float)
    return (int(z.shape[0]), int(z.shape[1])) if z.ndim == 2 else (1, int(z.size))


def _default_columns(fig: go.Figure) -> int:
    """Two columns for wide content (many heads, many categories, long legends), otherwise one."""
    for t in fig.data:
        if t.type == "heatmap" and _heatmap_shape(t)[1] > 16:
            return 2
        cats = _categories(getattr(t, "x", None)) if t.type in ("bar", "box", "scatter") else None
        if cats is not None and len(set(cats)) > 8:
            return 2
    return 2 if _legend_entries(fig) > 6 else 1


def _legend_rows(labels: Sequence[str], st: Style, max_width: float) -> int:
    """Rows of a horizontal plotly legend of ``labels`` at most ``max_width`` px wide (the plot width).

    As plotly.js lays it out: one row if all entries fit (each 40 px of symbol and gap + its text + 5 px), otherwise a
    grid whose columns are all as wide as the widest entry. Text is estimated at 0.46 em per character (Arial).
    """
    if not labels:
        return 0
    widths = [45 + len(html.unescape(x)) * 0.46 * st.font_size for x in labels]
    if sum(widths) <= max_width:
        return 1
    per_row = max(1, int(max_width // max(widths)))
    return math.ceil(len(labels) / per_row)


def _legible_dtick(n: int, length_px: float, needed_px: float) -> int:
    """Show every k-th of ``n`` evenly spaced ticks so that labels ``needed_px`` apart never overlap."""
    if n <= 1 or length_px <= 0:
        return 1
    return max(1, math.ceil(needed_px / (length_px / n)))


def apply_style(
    fig: go.Figure,
    style: "str | Style" = "paper",
    *,
    columns: int | None = None,
    width: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """A copy of ``fig`` in ``style`` (``"paper"`` or ``"notebook"``, see :data:`STYLES`), sized for export.

    Sets fonts, the figure size (``columns``: 1 = one column of a two-column paper, 2 = both; inferred from the
    content when omitted), margins, line and marker widths, the colour-blind-safe ``colorway``, and for heatmaps a
    symmetric diverging scale centred at 0 (heatmaps drawn with ``zmid=0``) or the sequential scale. Tick labels are
    thinned (numeric axes) or rotated then thinned (category axes, e.g. ``L{l}H{h}``) until they no longer
    overlap, so only legible labels are drawn. Long titles are wrapped. ``fig`` itself is not modified.
    """
    st = get_style(style)
    fig = go.Figure(fig)
    cols = int(columns) if columns is not None else _default_columns(fig)
    if cols not in (1, 2):
        raise MechcliffError(f"columns must be 1 or 2, got {columns!r}")
    w = int(width or st.width(cols))
    ml, mr, mt, mb = st.margin
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    colorbar_px = (st.colorbar_thickness + 3.2 * st.tick_size + 1.6 * st.font_size) if any(
        t.showscale is not False for t in heatmaps) else 0.0

    # ---- title (wrapped) and the space above the plot
    title = fig.layout.title.text
    n_lines = 0
    if title:
        title = _wrap_title(title, w - 12, st.title_size)
        n_lines = title.count("<br>") + 1
        mt = int(5 + n_lines * st.title_size * 1.3 + 3)
    n_entries = _legend_entries(fig)
    legend_top = st.legend_on_top and n_entries >= 2
    legend_above = legend_top or (fig.layout.legend.y is not None and fig.layout.legend.y > 1 and n_entries > 0)
    if legend_above:
        labels = list(dict.fromkeys(str(t.legendgroup or t.name) for t in fig.data if _in_legend(t)))
        rows = _legend_rows(labels, st, w - ml - mr) if legend_top else 1
        rows += 1 if legend_top and fig.layout.legend.title.text else 0  # the legend title gets its own row
        mt += int(rows * max(st.font_size * 1.3 + 5, 19) + 10)
    if any(a.yref in (None, "y") and a.yanchor == "bottom" and a.yshift for a in fig.layout.annotations):
        mt += int(st.tick_size * 1.4)  # value labels drawn above the tallest bars

    # ---- height
    if height is None:
        if heatmaps:
            n_y, n_x = _heatmap_shape(heatmaps[0])
            cell_w = max(1.0, (w - ml - mr - colorbar_px) / max(n_x, 1))
            cell_h = min(max(cell_w * 0.75, st.tick_size * 1.3), st.tick_size * 4)
            height = int(min(max(n_y * cell_h + mt + mb, 0.45 * w), 1.35 * w))
        else:
            height = int(round(w * st.aspect)) + max(0, n_lines - 1) * int(st.title_size * 1.25)
    h = int(height)
    plot_w = max(1.0, w - ml - mr - colorbar_px)
    plot_h = max(1.0, h - mt - mb)

    fig.update_layout(
        width=w, height=h, autosize=False,
        font=st.font, colorway=list(st.colorway),
        margin=dict(l=ml, r=mr, t=mt, b=mb, pad=0, autoexpand=True),
        hoverlabel=dict(font=dict(family=st.font_family)),
        legend=dict(font=dict(size=st.font_size), bgcolor="rgba(255,255,255,0.85)", tracegroupgap=2),
    )
    if title:  # plotly anchors a multi-line title by its last line: move it down by the extra lines
        fig.update_layout(title=dict(text=title, x=4 / w, xanchor="left", xref="container", yref="container",
                                     y=1 - (5 + (n_lines - 1) * st.title_size * 1.3) / h, yanchor="top",
                                     font=dict(size=st.title_size, family=st.font_family, color=st.text_color)))
    if n_entries >= 2:  # several lines / groups: always a legend
        fig.update_layout(showlegend=True)
    if legend_above:
        fig.update_layout(legend=dict(y=1.0, yanchor="bottom", bgcolor="rgba(255,255,255,0)", itemwidth=30))
    if legend_top:
        fig.update_layout(legend=dict(orientation="h", x=0.0, xanchor="left"))
        if fig.layout.legend.title.text:
            fig.update_layout(legend_title=dict(side="top left", font=dict(size=st.font_size)))

    # ---- traces
    for t in fig.data:
        if t.type == "heatmap":
            z = np.asarray(t.z, dtype=float)
            if t.zmid is not None and float(t.zmid) == 0.0:  # signed: symmetric diverging scale centred at 0
                finite = np.abs(z[np.isfinite(z)])
                m = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
                t.update(colorscale=st.diverging, zmin=-m, zmax=m, zmid=0.0)
            elif t.zmin is not None and float(t.zmin) >= 0:
                t.update(colorscale=st.sequential)
            t.update(colorbar=dict(thickness=st.colorbar_thickness, outlinewidth=0,
                                   tickfont=dict(size=st.tick_size), title=dict(font=dict(size=st.font_size))))
            continue
        if t.type == "bar":
            t.update(textfont=dict(size=st.tick_size))
        if hasattr(t, "line") and t.line is not None and t.type in ("scatter", "scattergl"):
            if t.line.width is not None:
                t.line.width = max(0.0, float(t.line.width) * st.line_scale) if t.line.width else t.line.width
            elif "lines" in (t.mode or "lines"):
                t.line.width = 2.0 * st.line_scale
        if t.type in ("scatter", "scattergl") and t.mode and "markers" in t.mode:
            t.marker.size = float(t.marker.size if isinstance(t.marker.size, (int, float)) else 6) * st.marker_scale
        for err in ("error_x", "error_y"):
            e = getattr(t, err, None)
            if e is not None and (e.array is not None or e.value is not None):
                e.thickness = float(e.thickness if e.thickness is not None else 2) * st.line_scale
                e.width = float(e.width if e.width is not None else 4) * st.marker_scale
    for shape in fig.layout.shapes:
        if shape.line is not None and shape.line.width is not None:
            shape.line.width = max(0.75, float(shape.line.width) * st.line_scale)
    for ann in fig.layout.annotations:
        ann.font.size = st.tick_size

    # ---- axes
    axis_common = dict(title_font=dict(size=st.font_size), tickfont=dict(size=st.tick_size), automargin=True,
                       title_standoff=4 if st.name == "paper" else None)
    for ax in list(fig.select_xaxes()) + list(fig.select_yaxes()):
        ax.update(**{k: v for k, v in axis_common.items() if v is not None})
        length = plot_w if ax.plotly_name.startswith("xaxis") else plot_h
        if ax.title.text and _label_px([ax.title.text], st.font_size) * 0.87 > length:  # longer than the axis: wrap
            ax.title.text = _wrap_title(ax.title.text, length, st.font_size)
        if ax.showgrid is not False:
            ax.update(gridcolor=st.grid_color, gridwidth=0.5 if st.name == "paper" else 1)
        if st.show_axis_lines:
            ax.update(showline=True, linecolor="#444444", linewidth=0.75, ticklen=3, tickwidth=0.75)
    _legible_ticks(fig, st, plot_w, plot_h)
    return fig


def _legible_ticks(fig: go.Figure, st: Style, plot_w: float, plot_h: float) -> None:
    """Thin (numeric) or rotate-then-thin (categorical) tick labels that would overlap."""
    for letter, length in (("x", plot_w), ("y", plot_h)):
        for trace in fig.data:
            axis_name = (getattr(trace, f"{letter}axis", None) or letter).replace(letter, f"{letter}axis", 1)
            ax = fig.layout[axis_name]
            if trace.type == "heatmap":
                n_y, n_x = _heatmap_shape(trace)
                n = n_x if letter == "x" else n_y
                vals = getattr(trace, letter)
                cats = _categories(vals)
                labels = cats if cats is not None else [str(n - 1)]
                need = _label_px(labels, st.tick_size) + 4 if letter == "x" else st.tick_size * 1.2
                k = _legible_dtick(n, length, need)
                if cats is not None:
                    ax.update(tickmode="array", tickvals=cats[::k], ticktext=cats[::k])
                elif ax.dtick is not None or n <= 64:
                    ax.update(dtick=k, tick0=0)
        if letter == "x":
            _category_ticks(fig, st, length)


def _category_ticks(fig: go.Figure, st: Style, plot_w: float) -> None:
    """Per category x axis (each subplot's own, over its own width): labels side by side if they fit with a gap,
    else slanted 45° if the slanted rows stay apart, else vertical, thinned until they no longer touch."""
    labels_by_axis: dict[str, list[str]] = {}
    for trace in fig.data:
        if trace.type not in ("bar", "box", "scatter"):
            continue
        cats = _categories(trace.x)
        if cats is None:
            continue
        axis_name = (getattr(trace, "xaxis", None) or "x").replace("x", "xaxis", 1)
        labels_by_axis.setdefault(axis_name, [])
        labels_by_axis[axis_name] += [c for c in dict.fromkeys(cats) if c not in labels_by_axis[axis_name]]
    for axis_name, uniq in labels_by_axis.items():
        ax = fig.layout[axis_name]
        domain = ax.domain if ax.domain is not None else (0.0, 1.0)
        size = float(ax.tickfont.size or fig.layout.font.size or st.font_size)  # plotly: ticks in the layout font
        spacing = plot_w * (float(domain[1]) - float(domain[0])) / max(len(uniq), 1)
        if _label_px(uniq, size) + 6 <= spacing:
            ax.update(tickangle=0)
        elif spacing >= 1.2 * size / math.sin(math.radians(45)):  # slanted rows 1.2 em apart
            ax.update(tickangle=-45)
        else:
            k = _legible_dtick(len(uniq), spacing * len(uniq), 1.2 * size)
            ax.update(tickangle=-90, tickmode="array", tickvals=uniq[::k], ticktext=uniq[::k])


def fit_category_ticks(fig: go.Figure, style: "str | Style" = "notebook", *, width: int | None = None) -> go.Figure:
    """Set the tick angle of ``fig``'s category x axes (in place; returns ``fig``) so that labels do not run
    together at ``width`` px (default: the figure's width, or plotly's 700 px when unset), as :func:`apply_style`
    does when it exports. For ``plot()`` methods whose bar labels are long (e.g. condition names)."""
    st = get_style(style)
    w = width or fig.layout.width or 700
    ml = fig.layout.margin.l if fig.layout.margin.l is not None else st.margin[0]
    mr = fig.layout.margin.r if fig.layout.margin.r is not None else st.margin[1]
    _category_ticks(fig, st, max(1.0, w - ml - mr))
    return fig
