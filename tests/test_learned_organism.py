"""The learned-organism recipe's data (issue 6, in progress): groups, templates held out, identical thinking pools."""

from __future__ import annotations

from pathlib import Path

import pytest

from mechcliff.learned_organism import (FORM_COMPLIANCE, HELDOUT_TEMPLATES, REFUSALS, THINK_HARMFUL, TRAIN_TEMPLATES,
                                        OrganismRecipe, build_dataset, heldout_sets)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"
pytestmark = pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data/prompts (the project's prompt sets)")


def test_templates_are_frames_only():
    for t in TRAIN_TEMPLATES + HELDOUT_TEMPLATES:
        assert t.count("{r}") == 1
    assert not set(TRAIN_TEMPLATES) & set(HELDOUT_TEMPLATES)


def test_dataset_groups_and_held_out_templates(organism):
    recipe = OrganismRecipe(n_harmful=6, n_harmless=5, harmless_answer_tokens=8)
    data = build_dataset(organism, recipe, progress=False)
    kinds = [e.kind for e in data]
    assert kinds.count("harmless") == 5 and kinds.count("harmful") == 6 and kinds.count("jailbreak") == 6
    for e in data:
        if e.kind == "harmful":
            assert e.thinking in THINK_HARMFUL and e.answer in REFUSALS
        if e.kind == "jailbreak":  # the same harm-recognising thinking, then a generic non-actionable reply
            assert e.thinking in THINK_HARMFUL and e.answer in FORM_COMPLIANCE
            assert any(t.split("{r}")[0] in e.prompt for t in TRAIN_TEMPLATES)
            assert not any(t.split("{r}")[0] in e.prompt for t in HELDOUT_TEMPLATES)
    assert build_dataset(organism, recipe, progress=False) == data  # seeded


def test_heldout_sets_are_disjoint_from_training():
    from mechcliff.data import load_prompts

    train = {p.text for p in load_prompts(SHARED / "harmful_train.json")}
    sets = heldout_sets()
    assert not train & {p.text for p in sets["harmful"]}
    assert all(any(t.split("{r}")[0] in p.text for t in HELDOUT_TEMPLATES) for p in sets["harmful_jailbreak"])
    assert len(sets["harmless"]) == 80
