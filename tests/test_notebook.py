"""Execute ``notebooks/01_refusal_cliff.ipynb`` end to end and check its key outputs.

The notebook is copied to a temporary folder and executed there with nbclient (kernel ``python3`` of the running
interpreter, working directory ``notebooks/``, 300 s per cell); the file in the repository is never modified. One
extra cell, appended to the temporary copy only, prints the key numbers as JSON so they can be checked without
parsing tables. If no ``python3`` kernelspec runs this interpreter, ipykernel's own kernelspec is installed into a
temporary prefix and found through ``JUPYTER_PATH``: the test never skips.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.organism

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOK = NOTEBOOK_DIR / "01_refusal_cliff.ipynb"
KERNEL = "python3"
PLANTED = ["L1H3", "L1H6", "L2H1"]
HARM_DETECTORS = ["L0H2", "L0H5"]
CELL_TIMEOUT = 300
PLOTLY_MIME = "application/vnd.plotly.v1+json"
PLOTLY_JS_MARKERS = ("plotly.js v", "window.PlotlyConfig")  # only present when the plotly.js bundle is embedded
CHECK_MARKER = "MECHCLIFF_NOTEBOOK_CHECK "

# Appended to the temporary copy only: reads the notebook's own variables.
CHECK_CELL = f"""
import json as _json
print({CHECK_MARKER!r} + _json.dumps({{
    "planted": [head_label(h) for h in planted],
    "top": list(top),
    "dpa_exact": bool(dpa.exact),
    "dpa_max_abs_error": float(dpa.max_abs_error),
    "probe_val_accuracy": float(probe.metrics["val_accuracy"]),
    "jailbreak_final": float(trace.group_stats()["harmful_jailbreak"]["final"]),
    "jailbreak_ms": float(trace.group_stats()["harmful_jailbreak"]["ms"]),
    "harmful_ms": float(trace.group_stats()["harmful"]["ms"]),
    "asr_before": ablation.asr_before["rate"],
    "asr_after": ablation.asr_after["rate"],
    "asr_random": [r["rate"] for r in ablation.asr_random],
    "harmless_refusal_after": ablation.harmless_refusal_after["rate"],
    "ablated_final": float(jb_trace_ablated.group_stats()["all"]["final"]),
    "reloaded_top": list(dpa_loaded.top(3)),
}}))
"""


# ---- kernel ---------------------------------------------------------------------------------------------------


def _runs_this_interpreter(argv: list[str]) -> bool:
    """True when a kernelspec's argv starts this interpreter (jupyter_client maps bare 'python*' to sys.executable)."""
    if not argv:
        return False
    exe = argv[0]
    if exe in {"python", f"python{sys.version_info[0]}", "python%i.%i" % sys.version_info[:2]}:
        return True
    try:
        return Path(exe).resolve() == Path(sys.executable).resolve()
    except OSError:
        return False


def _python3_spec_ok() -> bool:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
    except (NoSuchKernel, KeyError):
        return False
    return _runs_this_interpreter(list(spec.argv))


def _install_private_kernelspec(prefix: Path, mp: pytest.MonkeyPatch) -> None:
    """Install ipykernel's kernelspec (argv = this interpreter) under ``prefix`` and put it first on JUPYTER_PATH."""
    from ipykernel.kernelspec import install

    install(kernel_name=KERNEL, prefix=str(prefix))
    data_dir = prefix / "share" / "jupyter"
    assert (data_dir / "kernels" / KERNEL / "kernel.json").exists()
    old = os.environ.get("JUPYTER_PATH")
    mp.setenv("JUPYTER_PATH", str(data_dir) + (os.pathsep + old if old else ""))


def _ensure_kernel(prefix: Path, mp: pytest.MonkeyPatch, force_private: bool = False) -> str:
    if force_private or not _python3_spec_ok():
        _install_private_kernelspec(prefix, mp)
    assert _python3_spec_ok(), "could not provide a 'python3' kernel running this interpreter"
    return KERNEL


# ---- execution ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[nbformat.NotebookNode, float]:
    """The notebook executed in a temporary copy (plus the check cell), and its execution time in seconds."""
    assert NOTEBOOK.exists(), f"missing {NOTEBOOK}"
    tmp = tmp_path_factory.mktemp("notebook")
    copy = tmp / NOTEBOOK.name
    shutil.copyfile(NOTEBOOK, copy)
    nb = nbformat.read(copy, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECK_CELL.strip(), metadata={"tags": ["test-check"]}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        kernel = _ensure_kernel(tmp / "jupyter", mp)
        client = NotebookClient(
            nb, timeout=CELL_TIMEOUT, kernel_name=kernel, allow_errors=False, record_timing=False,
            resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
        )
        start = time.perf_counter()
        client.execute()  # raises CellExecutionError (with the traceback) if any cell fails
        seconds = time.perf_counter() - start
    nbformat.write(nb, copy)
    return nb, seconds


def _tagged(nb: nbformat.NotebookNode, tag: str) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def _stdout(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream" and o.get("name") == "stdout")


def _plain(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("data", {}).get("text/plain", "") for o in cell.get("outputs", []) if "data" in o)


def _check(nb: nbformat.NotebookNode) -> dict:
    out = _stdout(_tagged(nb, "test-check"))
    line = next((l for l in out.splitlines() if l.startswith(CHECK_MARKER)), None)
    assert line is not None, f"check cell printed nothing usable: {out!r}"
    return json.loads(line[len(CHECK_MARKER):])


# ---- tests ----------------------------------------------------------------------------------------------------


def test_notebook_runs_without_errors(executed):
    nb, seconds = executed
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    stderr = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                     if o.get("output_type") == "stream" and o.get("name") == "stderr")
    assert "Traceback" not in stderr, stderr
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    print(f"notebook executed in {seconds:.1f} s")


def test_notebook_recovers_planted_heads(executed):
    nb, _ = executed
    printed = _stdout(_tagged(nb, "top-heads"))
    m = re.search(r"top suppression heads: \[(.*?)\]", printed)
    assert m, printed
    assert sorted(re.findall(r"L\d+H\d+", m.group(1))) == sorted(PLANTED), printed
    assert "recovered: True" in printed
    assert re.search(r"max \|sum of components - probe logit\| = [0-9.e+-]+", printed)
    truth = _stdout(_tagged(nb, "ground-truth"))
    assert all(h in truth for h in PLANTED + HARM_DETECTORS), truth
    check = _check(nb)
    assert sorted(check["top"]) == sorted(check["planted"]) == sorted(PLANTED)
    assert check["dpa_exact"] and check["dpa_max_abs_error"] < 1e-3
    assert check["reloaded_top"] == check["top"]


def test_notebook_shows_cliff_and_interventions(executed):
    nb, _ = executed
    check = _check(nb)
    assert check["probe_val_accuracy"] >= 0.9
    assert check["jailbreak_ms"] > 0.5 > check["jailbreak_final"]  # the cliff
    assert check["harmful_ms"] < 0.2  # plain harmful prompts: no cliff
    assert check["ablated_final"] > 0.5  # cliff gone with the suppression heads ablated
    assert check["asr_before"] == 1.0 and check["asr_after"] == 0.0
    assert check["asr_random"] and all(r == 1.0 for r in check["asr_random"])
    assert check["harmless_refusal_after"] == 0.0
    restore = _plain(_tagged(nb, "restore"))
    assert "L1H3, L1H6, L2H1" in restore, restore
    amplify = _plain(_tagged(nb, "amplify"))
    row = next((l for l in amplify.splitlines() if "amplified (gamma=2)" in l), "")
    assert re.search(r"amplified \(gamma=2\)\s+1\.0\s+0\.0\b", row), amplify


def test_notebook_figures_are_plotly_json_without_bundle(executed):
    nb, _ = executed
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    figures = [o for o in outputs if PLOTLY_MIME in o.get("data", {})]
    assert len(figures) >= 4, f"expected >= 4 plotly figures, got {len(figures)}"
    text = json.dumps([o.get("data", {}) for o in outputs])
    assert not any(m in text for m in PLOTLY_JS_MARKERS), "plotly.js bundle embedded in the outputs"


def test_committed_notebook_is_executed_and_small():
    """The notebook in the repository is stored with outputs (as users first see it), without plotly.js."""
    raw = NOTEBOOK.read_text(encoding="utf-8")
    assert len(raw) < 2_000_000, f"{NOTEBOOK.name} is {len(raw)} bytes"
    assert not any(m in raw for m in PLOTLY_JS_MARKERS)
    nb = nbformat.reads(raw, as_version=4)
    nbformat.validate(nb)
    text = raw.lower()
    assert "content warning" in text and "2510.06036" in text
    for tag in ("ground-truth", "top-heads", "ablation", "restore", "amplify", "reload"):
        assert _tagged(nb, tag).get("outputs"), f"cell {tag!r} has no stored output"
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert sum(PLOTLY_MIME in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])) >= 4


def test_private_kernelspec_runs_this_interpreter(tmp_path):
    """The fallback path: ipykernel's kernelspec installed into a temporary prefix is found and runs this Python."""
    from jupyter_client.kernelspec import KernelSpecManager

    with pytest.MonkeyPatch.context() as mp:
        assert _ensure_kernel(tmp_path / "jupyter", mp, force_private=True) == KERNEL
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
        assert Path(spec.resource_dir).resolve().is_relative_to((tmp_path / "jupyter").resolve())
        assert Path(spec.argv[0]).resolve() == Path(sys.executable).resolve()
