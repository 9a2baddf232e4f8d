"""`mechcliff patch`, `sweep` and `ships` on a finished run folder (issue 16 item 13: these were Python only)."""

from __future__ import annotations

import json

import pytest

from mechcliff.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tools") / "run"
    assert main(["run", "--out", str(out), "--no-progress", "--n-per-group", "6"]) == 0
    return out


@pytest.mark.organism
def test_patch_finds_the_planted_heads(run, tmp_path, capsys):
    out = tmp_path / "patch"
    assert main(["patch", str(run), "--out", str(out), "--no-progress", "--n-per-group", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 4 and summary["metric"] == "probe_logit"
    assert sorted(summary["top_heads"][:3]) == ["L1H3", "L1H6", "L2H1"]  # the organism's planted suppression heads
    assert (out / "head_patching" / "result.json").exists() and (out / "head_patching.html").exists()
    assert "top heads by normalised effect: " in capsys.readouterr().out


@pytest.mark.organism
def test_sweep_writes_resumable_cells(run, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", str(run), "--out", str(out), "--no-progress", "--ks", "1,3", "--n-random", "0",
            "--n-per-group", "3"]
    assert main(argv) == 0
    cells = json.loads((out / "summary.json").read_text())["cells"]
    assert [(c["k"], c["selection"]) for c in cells] == [(1, "ranked"), (3, "ranked")]
    assert cells[-1]["asr"] == 0.0  # the three planted heads ablated: the jailbreaks are refused again
    lines = (out / "cells.jsonl").read_text()
    assert main(argv) == 0 and (out / "cells.jsonl").read_text() == lines  # resumed, nothing recomputed


@pytest.mark.organism
def test_ships_and_sahara(run, tmp_path, capsys):
    out = tmp_path / "ships"
    assert main(["ships", str(run), "--out", str(out), "--no-progress", "--n-per-group", "2", "--sahara", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["top_heads"]) == 10 and len(summary["sahara_heads"]) == 1
    assert (out / "head_importance.html").exists() and (out / "sahara" / "result.json").exists()


@pytest.mark.organism
def test_sweep_rejects_bad_grids_with_the_flag(run, tmp_path, capsys):
    assert main(["sweep", str(run), "--out", str(tmp_path / "s"), "--ks", "1,x"]) == 2
    assert "--ks must be comma-separated numbers" in capsys.readouterr().err


@pytest.mark.unit
def test_tools_need_a_finished_run_folder(tmp_path, capsys):
    assert main(["patch", str(tmp_path), "--out", str(tmp_path / "p")]) == 2
    assert "is not a run folder of 'mechcliff run'" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text(json.dumps({"mechcliff_run": 1, "status": "interrupted", "config": {}}))
    assert main(["ships", str(tmp_path), "--out", str(tmp_path / "p")]) == 2
    assert "not a finished run (status 'interrupted')" in capsys.readouterr().err


@pytest.mark.organism
def test_patch_names_the_groups_a_run_has(run, tmp_path, capsys):
    assert main(["patch", str(run), "--out", str(tmp_path / "p"), "--source", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "has no 'nonsense' rollouts" in err and "harmful_jailbreak" in err
