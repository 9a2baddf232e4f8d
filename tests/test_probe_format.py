"""The probe is a Result: saved like every result, loaded by ``Result.load`` and ``LinearProbe.load``; probes
saved before it was one (``probe.json`` + ``probe.safetensors``) load the same."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from mechcliff.probe import LinearProbe
from mechcliff.results import Result

pytestmark = pytest.mark.unit


def _probe() -> LinearProbe:
    return LinearProbe(w=np.linspace(-1, 1, 8), b=-0.25, layer=3, model_id="m", model_hash="abc",
                       label_source="dataset", metrics={"val_accuracy": 0.75, "val_auroc": None, "n_val": 8},
                       provenance={"seed": 0})


def _same(a: LinearProbe, b: LinearProbe) -> None:
    assert np.array_equal(a.w, b.w) and a.w.dtype == b.w.dtype == np.float64
    for f in ("b", "layer", "site", "position", "model_id", "model_hash", "label_source", "metrics", "provenance"):
        assert getattr(a, f) == getattr(b, f), f


def test_a_probe_saves_as_a_result_and_loads_with_either_class(tmp_path):
    p = _probe()
    p.save(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "result.json").read_text())["kind"] == "linear_probe"
    _same(LinearProbe.load(tmp_path / "p"), p)
    loaded = Result.load(tmp_path / "p")
    assert isinstance(loaded, LinearProbe)
    _same(loaded, p)


def test_a_probe_saved_in_the_old_format_still_loads(tmp_path):
    """The old writer's layout, written by hand: probe.json (kind, format_version, fields) + probe.safetensors."""
    p = _probe()
    d = tmp_path / "old"
    d.mkdir()
    save_file({"w": p.w.astype(np.float64)}, str(d / "probe.safetensors"))
    meta = {k: v for k, v in vars(p).items() if k != "w"}
    (d / "probe.json").write_text(json.dumps({"kind": "linear_probe", "format_version": 1, **meta}))
    _same(LinearProbe.load(d), p)
    _same(Result.load(d), p)
    from mechcliff.figures import find_results, load_saved

    assert [s.kind for s in find_results(tmp_path)] == ["linear_probe"]
    _same(load_saved(d), p)
