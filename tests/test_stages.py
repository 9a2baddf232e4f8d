"""The stage runner shared by the pipeline and the repair curve: a stage is computed once per key, loaded after,
recomputed when its key changes or its saved results do not load; folders from before markers are adopted."""

from __future__ import annotations

import json

import pytest

from mechcliff.data import Prompt
from mechcliff.stages import Stages, write_manifest

pytestmark = pytest.mark.unit


def _stage(tmp_path, logs):
    calls = []
    out = tmp_path / "x.json"

    def compute():
        calls.append(1)
        out.write_text(json.dumps({"n": len(calls)}))

    def load():
        return json.loads(out.read_text())["n"]

    return Stages(tmp_path, logs.append), compute, load, calls, out


def test_a_stage_runs_once_per_key(tmp_path):
    logs: list[str] = []
    stages, compute, load, calls, out = _stage(tmp_path, logs)
    assert stages.run("s", "k1", compute, load) == 1
    assert stages.run("s", "k1", compute, load) == 1 and len(calls) == 1
    assert (tmp_path / "stages" / "s.done").read_text() == "k1\n"
    assert stages.run("s", "k2", compute, load) == 2  # another key: recomputed
    out.write_text("{trunc")  # saved results that do not load: recomputed, saying so
    assert stages.run("s", "k2", compute, load) == 3
    assert any("[s] saved results do not load" in m for m in logs)


def test_results_saved_before_markers_are_adopted_once(tmp_path):
    stages, compute, load, calls, out = _stage(tmp_path, [])
    out.write_text(json.dumps({"n": 7}))
    assert stages.run("s", "k", compute, load, legacy=out.exists) == 7 and not calls
    assert stages.done("s", "k")
    # a marker with another key is not overridden by the legacy rule
    assert stages.run("s", "other", compute, load, legacy=out.exists) == 1 and calls == [1]


def test_the_manifest_keeps_its_creation_time_and_the_model_it_recorded(tmp_path):
    prompts = {"harmful": [Prompt("a"), Prompt("b")]}
    first = write_manifest(tmp_path, "mechcliff_test", status="running", config={"x": 1}, prompts=prompts,
                           handle=None)
    doc = json.loads((tmp_path / "manifest.json").read_text())
    assert doc["mechcliff_test"] == 1 and doc["status"] == "running" and doc["prompts"]["harmful"]["n"] == 2
    doc["model"] = {"id": "m"}
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    second = write_manifest(tmp_path, "mechcliff_test", status="finished", config={"x": 1}, prompts=prompts,
                            handle=None, seconds=1.234)
    assert second["created"] == first["created"] and second["model"] == {"id": "m"}
    assert second["total_seconds"] == 1.23 and second["status"] == "finished"
