"""Plotly figures for mechcliff reports.

Every function takes numpy / plain Python inputs and returns a
``plotly.graph_objects.Figure``; nothing here calls ``show()`` or writes files.
All figures share one style, :data:`TEMPLATE` (registered in ``plotly.io.templates``
as ``"mechcliff"``): a white background, the colour-blind-safe Okabe-Ito palette for
categories and the diverging ``"RdBu_r"`` scale, centred at zero, for signed attributions.

Text passed in (titles, group names) is shown literally: ``<`` and ``>`` are escaped,
so a label such as ``"</think>"`` is displayed rather than parsed as markup.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

from mechcliff.errors import MechcliffError

__all__ = [
    "DIVERGING_SCALE",
    "OKABE_ITO",
    "TEMPLATE",
    "TEMPLATE_NAME",
    "asr_bars",
    "cliff_curves",
    "cliff_histogram",
    "figure_to_html",
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

#: Name under which :data:`TEMPLATE` is registered in ``plotly.io.templates``.
TEMPLATE_NAME = "mechcliff"

_FONT_FAMILY = "Inter, 'Helvetica Neue', Arial, sans-serif"
_GRID = "#e5e5e5"
_OUTLINE = "#000000"
_REFERENCE_LINE = "#555555"


def _build_template() -> go.layout.Template:
    """The shared layout template: plotly_white plus the mechcliff colours and fonts."""
    template = go.layout.Template(pio.templates["plotly_white"])
    template.layout.update(
        colorway=list(OKABE_ITO),
        font=dict(family=_FONT_FAMILY, size=13, color="#222222"),
        title=dict(x=0.0, xanchor="left", font=dict(size=17)),
        colorscale=dict(diverging=DIVERGING_SCALE),
        hoverlabel=dict(font=dict(family=_FONT_FAMILY)),
        legend=dict(bgcolor="rgba(255,255,255,0.8)"),
        margin=dict(l=70, r=30, t=80, b=60),
        xaxis=dict(gridcolor=_GRID, zeroline=False, ticks="outside"),
        yaxis=dict(gridcolor=_GRID, zeroline=False, ticks="outside"),
    )
    return template


#: The mechcliff plotly template (also available as ``template="mechcliff"``).
TEMPLATE: go.layout.Template = _build_template()
pio.templates[TEMPLATE_NAME] = TEMPLATE


def _text(s: object) -> str:
    """Escape text for plotly labels (plotly renders a subset of HTML and decodes entities)."""
    return html.escape(str(s), quote=False)


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
) -> go.Figure:
    """Heatmap of a per-head quantity, shape ``[n_layers, n_heads]``.

    Layers run down the y axis (layer 0 at the top), heads along x. The colour range is
    symmetric around zero. Cells listed in ``highlight`` as ``(layer, head)`` are outlined
    and get a legend entry called ``highlight_name``.
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
        colorscale=DIVERGING_SCALE,
        zmin=-m,
        zmax=m,
        zmid=0.0,
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
    fig.update_layout(
        template=TEMPLATE,
        title=dict(text=_text(title)),
        height=460,
        hovermode="closest",
        legend=dict(x=0.01, xanchor="left", y=0.01, yanchor="bottom"),
    )
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
    fig.add_hline(
        y=0.5,
        line=dict(dash="dot", color="#999999", width=1),
        annotation=dict(text="chance", font=dict(color="#999999", size=11)),
        annotation_position="bottom right",
    )
    if chosen_layer is not None:
        if int(chosen_layer) not in {int(v) for v in x}:
            raise MechcliffError(f"chosen_layer={chosen_layer} is not one of the plotted layers")
        fig.add_vline(
            x=int(chosen_layer),
            line=dict(dash="dash", color=_REFERENCE_LINE, width=1.5),
            annotation=dict(text=f"chosen layer {int(chosen_layer)}", font=dict(color=_REFERENCE_LINE)),
            annotation_position="top left",
            name="chosen layer",
        )
    fig.update_layout(
        template=TEMPLATE,
        title=dict(text=_text(title)),
        height=420,
        hovermode="x unified",
        legend=dict(x=0.99, xanchor="right", y=0.02, yanchor="bottom"),
    )
    fig.update_xaxes(title_text="layer", dtick=1 if x.size <= 40 else None)
    fig.update_yaxes(title_text="score", range=[0.4, 1.02])
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
    """Overlaid histograms (fraction of examples) of the misalignment score per group, on shared bins."""
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
    size = (hi - lo) / n_bins
    xbins = dict(start=lo, end=hi + size * 1e-6, size=size)

    fig = go.Figure()
    for i, (group, arr) in enumerate(data.items()):
        fig.add_trace(
            go.Histogram(
                x=arr,
                name=f"{_text(group)} (n={arr.size})",
                xbins=xbins,
                autobinx=False,
                histnorm="probability",
                marker=dict(color=_color(i), line=dict(color=_color(i), width=1)),
                opacity=0.55,
                hovertemplate="MS %{x}<br>fraction %{y:.3f}<extra>%{fullData.name}</extra>",
            )
        )
    fig.update_layout(template=TEMPLATE, title=dict(text=_text(title)), barmode="overlay", height=420)
    fig.update_xaxes(title_text=_text(x_title))
    fig.update_yaxes(title_text="fraction of examples")
    return fig


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
