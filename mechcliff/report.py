"""Self-contained HTML reports.

:func:`write_report` writes one HTML file that opens offline: plotly.js is embedded inline
once (with the first figure) and nothing is loaded from the network. Section bodies given
as strings are inserted as raw HTML (build tables with :func:`html_table`, which escapes).
"""

from __future__ import annotations

import html
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from mechcliff.errors import MechcliffError
from mechcliff.plotting import figure_to_html

__all__ = ["CONTENT_WARNING", "html_table", "write_report"]

CONTENT_WARNING = "Content warning: this report may quote requests for harmful content."

_CSS = """
:root { --fg: #222; --muted: #666; --rule: #ddd; --accent: #0072B2; --warn-bg: #fff4e5; --warn: #8a4b00; }
* { box-sizing: border-box; }
body { font-family: Inter, "Helvetica Neue", Arial, sans-serif; color: var(--fg); margin: 0; line-height: 1.45; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5rem 1.5rem 3rem; }
h1 { font-size: 1.7rem; margin: 0.6rem 0 1rem; }
h2 { font-size: 1.25rem; margin: 2.2rem 0 0.8rem; padding-bottom: 0.25rem; border-bottom: 1px solid var(--rule); }
.content-warning { background: var(--warn-bg); color: var(--warn); border-left: 4px solid #E69F00;
  padding: 0.5rem 0.8rem; font-size: 0.92rem; }
nav ol { margin: 0.3rem 0 0; padding-left: 1.3rem; font-size: 0.92rem; }
nav a { color: var(--accent); text-decoration: none; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 0.5rem 0; }
th, td { border-bottom: 1px solid var(--rule); padding: 0.3rem 0.7rem; text-align: left; vertical-align: top; }
th { background: #f6f6f6; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.summary th { background: none; color: var(--muted); font-weight: 500; }
.figure { width: 100%; margin: 0.5rem 0; }
.table-wrap { overflow-x: auto; }
footer { margin-top: 3rem; padding-top: 0.8rem; border-top: 1px solid var(--rule); color: var(--muted);
  font-size: 0.85rem; }
footer ul { padding-left: 1.2rem; }
"""


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _format_cell(value: object) -> tuple[str, bool]:
    """Cell text (unescaped) and whether it is numeric."""
    if value is None:
        return "", False
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)), False
    if isinstance(value, (int, np.integer)):
        return str(int(value)), True
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return ("n/a" if math.isnan(v) else f"{v:.3f}"), True
    return str(value), False


def html_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An HTML ``<table>``: every cell escaped, floats to 3 decimals, NaN as ``n/a``."""
    width = len(header)
    parts = ['<div class="table-wrap"><table>', "<thead><tr>"]
    parts += [f"<th>{_esc(h)}</th>" for h in header]
    parts.append("</tr></thead><tbody>")
    for i, row in enumerate(rows):
        if len(row) != width:
            raise MechcliffError(f"html_table: row {i} has {len(row)} cells but the header has {width}")
        parts.append("<tr>")
        for cell in row:
            text, numeric = _format_cell(cell)
            cls = ' class="num"' if numeric else ""
            parts.append(f"<td{cls}>{_esc(text)}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table></div>")
    return "".join(parts)


def _render(
    title: str,
    summary_rows: Sequence[tuple[str, str]],
    sections: Sequence[tuple[str, str | go.Figure]],
    notes: Sequence[str] | None,
) -> str:
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<main>",
        f'<p class="content-warning">{_esc(CONTENT_WARNING)}</p>',
        f"<h1>{_esc(title)}</h1>",
    ]
    if summary_rows:
        out.append('<table class="summary"><tbody>')
        for row in summary_rows:
            if len(row) != 2:
                raise MechcliffError(f"summary_rows entries must be (key, value) pairs, got {row!r}")
            key, value = row
            out.append(f"<tr><th>{_esc(key)}</th><td>{_esc(value)}</td></tr>")
        out.append("</tbody></table>")
    if len(sections) > 1:
        out.append("<nav><ol>")
        out += [f'<li><a href="#section-{i}">{_esc(heading)}</a></li>' for i, (heading, _) in enumerate(sections, 1)]
        out.append("</ol></nav>")

    plotlyjs_included = False
    for i, section in enumerate(sections, 1):
        if len(section) != 2:
            raise MechcliffError(f"sections entries must be (heading, html or figure) pairs, got {section!r}")
        heading, body = section
        out.append(f'<section id="section-{i}">')
        out.append(f"<h2>{_esc(heading)}</h2>")
        if isinstance(body, go.Figure):
            fragment = figure_to_html(body, include_plotlyjs=not plotlyjs_included, div_id=f"figure-{i}")
            plotlyjs_included = True
            out.append(f'<div class="figure">{fragment}</div>')
        elif isinstance(body, str):
            out.append(body)
        else:
            raise MechcliffError(
                f"section {heading!r}: body must be an HTML string or a plotly Figure, got {type(body).__name__}"
            )
        out.append("</section>")

    out.append("<footer>")
    if notes:
        out.append("<ul>")
        out += [f"<li>{_esc(note)}</li>" for note in notes]
        out.append("</ul>")
    out.append("<p>Generated by mechcliff. This file is self-contained and works offline.</p>")
    out += ["</footer>", "</main>", "</body>", "</html>", ""]
    return "\n".join(out)


def write_report(
    path: str | os.PathLike[str],
    *,
    title: str,
    summary_rows: list[tuple[str, str]],
    sections: list[tuple[str, str | go.Figure]],
    notes: list[str] | None = None,
) -> None:
    """Write a self-contained HTML report to ``path`` atomically (temp file + ``os.replace``).

    Layout: content warning, title, key/value summary table, then each section (heading plus
    either raw HTML or a figure), then a footer with ``notes``. Only the first figure embeds
    plotly.js; the file references no external resources.
    """
    target = Path(path)
    document = _render(title, summary_rows, sections, notes)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(document)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
