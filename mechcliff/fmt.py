"""Numbers for people: the formatting shared by the reports (:mod:`mechcliff.report_run`) and the commands.

A foundation module (it imports only :mod:`mechcliff.errors`), so anything may use it (the command line, :mod:`mechcliff.cli`,
sits on top of the analysis modules and is imported by none of them).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np

from mechcliff.errors import MechcliffError

__all__ = ["fmt", "html_table"]


def fmt(value: object, digits: int = 2) -> str:
    """A number for people: ``n/a`` for undefined (None / NaN) values."""
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else str(value)


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
