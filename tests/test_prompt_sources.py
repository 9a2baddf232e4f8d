"""Prompt sources are a registry: ``data`` knows no provider, and the providers register themselves when the layer
that uses them (experiments, commands) imports them. Checked in a fresh interpreter, where nothing else has
imported the provider first."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_a_run_of_the_learned_organism_finds_its_heldout_sets_in_a_fresh_interpreter(tmp_path):
    out = _fresh("from mechcliff.pipeline import Run, RunConfig\n"
                 f"r = Run({str(tmp_path / 'run')!r}, RunConfig.from_dict({{'model': 'smollm2-refusal-organism'}}))\n"
                 "print(sorted((k, len(v)) for k, v in r.prompt_groups().items()))")
    assert out.returncode == 0, out.stderr
    groups = dict(eval(out.stdout))
    assert set(groups) == {"harmless", "harmful", "harmful_jailbreak"} and min(groups.values()) > 0


def test_data_alone_knows_no_provider_and_says_how_sources_register():
    out = _fresh("from mechcliff.data import prompt_source\nprompt_source('heldout:harmful')")
    assert out.returncode != 0
    assert "no source 'heldout:' is registered" in out.stderr and "registers it when imported" in out.stderr
