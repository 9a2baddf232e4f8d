"""Execute ``notebooks/02_paper_figures.ipynb`` as ``tests/test_notebook.py`` executes notebook 01.

The notebook is copied to a temporary folder and run there (kernel ``python3`` of this interpreter, working directory
``notebooks/``) on a small synthetic run folder (``MECHCLIFF_RUN``, built as in ``tests/test_figures.py``), so no
model is built; one extra cell, appended to the copy only, prints the key facts as JSON. The repository's file is
never modified.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_figures import BROWSER, PNG_MAGIC, RUN_FIGURES, build_run_folder
from test_notebook import CELL_TIMEOUT, NOTEBOOK_DIR, PLOTLY_JS_MARKERS, PLOTLY_MIME, _ensure_kernel, _tagged

# No model, but a Jupyter kernel and Chromium (tens of seconds).
pytestmark = [pytest.mark.unit, pytest.mark.external]

NOTEBOOK = NOTEBOOK_DIR / "02_paper_figures.ipynb"
CHECK_MARKER = "MECHCLIFF_FIGURES_CHECK "
CHECK_CELL = f"""
import json as _json, sys as _sys
print({CHECK_MARKER!r} + _json.dumps({{
    "available": sorted(specs),
    "rendered": sorted(figs),
    "exported": [str(p) for p in export_report.files["attribution_heatmap"]],
    "heat_range": [t.zmin for t in figs["attribution_heatmap"].data if t.type == "heatmap"]
                  + [t.zmax for t in figs["attribution_heatmap"].data if t.type == "heatmap"],
    "model_libraries": [m for m in ("transformers", "transformer_lens") if m in _sys.modules],
}}))
"""


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    assert NOTEBOOK.exists(), f"missing {NOTEBOOK}"
    tmp = tmp_path_factory.mktemp("notebook02")
    run = build_run_folder(tmp / "run")
    copy = tmp / NOTEBOOK.name
    shutil.copyfile(NOTEBOOK, copy)
    nb = nbformat.read(copy, as_version=4)
    # the export cell's report is overwritten by the plot-run cell: keep the first one under its own name
    export = _tagged(nb, "export")
    export.source += "\nexport_report = report"
    nb.cells.append(nbformat.v4.new_code_cell(CHECK_CELL.strip(), metadata={"tags": ["test-check"]}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MECHCLIFF_RUN", str(run))
        mp.setenv("HF_HUB_OFFLINE", "1")
        kernel = _ensure_kernel(tmp / "jupyter", mp)
        client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name=kernel, allow_errors=False, record_timing=False,
                                resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
        start = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - start
    return nb, seconds


def _check(nb) -> dict:
    out = "".join(o.get("text", "") for o in _tagged(nb, "test-check").get("outputs", []) if o.get("name") == "stdout")
    line = next((l for l in out.splitlines() if l.startswith(CHECK_MARKER)), None)
    assert line is not None, out
    return json.loads(line[len(CHECK_MARKER):])


def test_notebook_draws_the_run_figures_without_the_model(executed):
    nb, seconds = executed
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    check = _check(nb)
    assert set(check["available"]) == set(check["rendered"]) == RUN_FIGURES
    assert check["model_libraries"] == []
    low, high = check["heat_range"]
    assert low == -high and high > 0  # the attribution heatmap is centred at 0
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert sum(PLOTLY_MIME in o.get("data", {}) for o in outputs) >= 4
    assert not any(m in json.dumps([o.get("data", {}) for o in outputs]) for m in PLOTLY_JS_MARKERS)
    print(f"notebook 02 executed in {seconds:.1f} s")


def test_notebook_exports_pdf_and_png(executed):
    nb, _ = executed
    exported = _check(nb)["exported"]
    if BROWSER is None:
        assert any(p.endswith(".html") for p in exported)
        pytest.skip("no Chrome/Chromium: the notebook wrote HTML instead (`make browser` installs one)")
    pdf, png = (Path(p) for p in exported)
    assert pdf.suffix == ".pdf" and pdf.read_bytes()[:4] == b"%PDF"
    assert png.suffix == ".png" and png.read_bytes()[:8] == PNG_MAGIC


def test_committed_notebook_is_executed_and_small():
    raw = NOTEBOOK.read_text(encoding="utf-8")
    assert len(raw) < 1_000_000
    assert not any(m in raw for m in PLOTLY_JS_MARKERS)
    nb = nbformat.reads(raw, as_version=4)
    nbformat.validate(nb)
    for tag in ("setup", "available", "load", "style", "cliff", "export"):
        assert _tagged(nb, tag).get("outputs"), f"cell {tag!r} has no stored output"
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
