"""Every run option says which stage's results it changes, and the stage hashes follow from that: changing an
option recomputes its stage and every later one, and nothing earlier (the resume contract of a run folder)."""

from __future__ import annotations

import dataclasses

import pytest

from mechcliff.pipeline import Run, RunConfig

pytestmark = pytest.mark.unit

#: A different valid value for each option (the test fails when an option is added without one here).
CHANGED = {
    "model": "smollm2", "adapter": "/tmp/adapter", "prompts": {"harmful": "x.jsonl"}, "n_per_group": 7,
    "label_source": "dataset", "probe_groups": ["harmful"], "probe_layer": 2, "position": "last", "plateau": "max",
    "max_think_tokens": 5, "max_answer_tokens": 6, "temperature": 0.7, "top_p": 0.9, "n_samples": 3,
    "batch_size": 3, "seed": 9,
    "enable_thinking": False, "think_format": "qwen3",
    "device": "cuda:1", "dtype": "bfloat16", "device_map": "auto", "ablation_top_k": 4, "ablation_mode": "zero",
    "ablation_gamma": 0.5, "n_random_sets": 1, "quick": True,
    "rollouts": {"harmful": "imported.jsonl"},
}


def _hashes(cfg: RunConfig, tmp_path) -> dict[str, str]:
    run = Run(tmp_path / "run", cfg)
    run.prompts_hash = "prompts"
    return {s: run._hash(s) for s in Run.STAGES}


def test_every_option_names_a_stage_and_its_types():
    for f in dataclasses.fields(RunConfig):
        assert f.metadata.get("stage", "missing") in (*Run.STAGES, None), f"option {f.name} names no stage"
        assert f.metadata.get("types"), f"option {f.name} names no types"
        assert isinstance(getattr(RunConfig(), f.name), f.metadata["types"]), f.name
    assert set(CHANGED) == {f.name for f in dataclasses.fields(RunConfig)}


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_changing_an_option_recomputes_its_stage_and_the_later_ones_only(name, tmp_path):
    base = _hashes(RunConfig(), tmp_path)
    changed = _hashes(dataclasses.replace(RunConfig(), **{name: CHANGED[name]}), tmp_path)
    first = RunConfig.stage_of()[name]
    for i, stage in enumerate(Run.STAGES):
        recomputed = first is not None and i >= Run.STAGES.index(first)
        assert (base[stage] != changed[stage]) == recomputed, (name, stage)
