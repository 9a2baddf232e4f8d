"""The page of a spectral result: the Safe − Unsafe gap heatmaps of B1, B2 and B3 (:func:`spectral_figures`) and the
saved result with its self-contained HTML page (:func:`write_spectral`)."""

from __future__ import annotations

from typing import Any

from mechcliff.errors import MechcliffError
from mechcliff.spectral.metrics import METRIC_NAMES, METRICS, SpectralHeadMetrics


def spectral_figures(result: SpectralHeadMetrics) -> dict[str, Any]:
    """The Safe − Unsafe gap heatmap of each metric, B1, B2 and B3 (``metric -> figure``), key heads outlined."""
    return {m: result.plot(metric="gap", of=m) for m in METRICS}


def write_spectral(result: SpectralHeadMetrics, out: str, name: str = "spectral") -> tuple[Any, Any]:
    """Save ``result`` to ``out/name`` and write ``out/name.html``: a self-contained page (offline, plotly.js inlined
    once) with the summary, the key heads of each metric and the gap heatmaps of B1, B2 and B3."""
    from pathlib import Path

    from mechcliff.report import write_report

    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise MechcliffError(f"--out {out} exists and is not a folder")
    path = result.save(out_dir / name)
    html = out_dir / f"{name}.html"
    rows = list(result.summary_rows())
    rows[-1:-1] = [(f"key heads by {m.upper()}", ", ".join(result.key_head_labels(m)) or "none") for m in METRICS]
    sections = [(METRIC_NAMES[m], fig) for m, fig in spectral_figures(result).items()]
    write_report(html, title=f"Spectral head metrics: {result.model_id or 'model'}", summary_rows=rows,
                 sections=sections, notes=[f"Key heads: |g′| ≥ {result.key_ratio:g}·max|g′| within each layer, g′ the "
                                           f"adaptively power-scaled Safe − Unsafe gap (q = {result.q:g})."])
    return path, html

