"""The learned-organism recipe (issue 6): its data (groups, held-out templates and prompts, identical thinking pools),
the held-out prompt sets in run configs, and shipping the adapter. Its behaviour is tested in the integration tier."""

from __future__ import annotations

from pathlib import Path

import pytest

from mechcliff.errors import MechcliffError
from mechcliff.learned_organism import (FORM_COMPLIANCE, HELDOUT_TEMPLATES, REFUSALS, THINK_HARMFUL, THINK_TURN,
                                        TRAIN_TEMPLATES, OrganismRecipe, _norm, build_dataset, heldout_sets,
                                        install_adapter)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"
pytestmark = pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data/prompts (the project's prompt sets)")


@pytest.mark.unit
def test_templates_are_frames_only():
    for t in TRAIN_TEMPLATES + HELDOUT_TEMPLATES:
        assert t.count("{r}") == 1
    assert not set(TRAIN_TEMPLATES) & set(HELDOUT_TEMPLATES)


@pytest.mark.organism
def test_dataset_groups_and_held_out_templates(organism):
    recipe = OrganismRecipe(n_harmful=6, n_extra_harmful=4, extra_framed_fraction=0.5, n_harmless=5,
                            harmless_answer_tokens=8)
    data = build_dataset(organism, recipe, progress=False)
    kinds = [e.kind for e in data]
    # harmful_train prompts twice (plain + framed); half the 4 extra AdvBench prompts framed
    assert kinds.count("harmless") == 5 and kinds.count("harmful") == 8 and kinds.count("jailbreak") == 8
    heldout = {_norm(p.text) for ps in heldout_sets().values() for p in ps}
    assert not any(_norm(e.prompt) in heldout for e in data)
    for e in data:
        if e.kind == "harmful":
            assert e.thinking in THINK_HARMFUL and e.answer in REFUSALS
        if e.kind == "jailbreak":  # the same harm-recognising thinking, then a generic non-actionable reply
            assert e.thinking in THINK_HARMFUL and e.answer in FORM_COMPLIANCE
            assert any(t.split("{r}")[0] in e.prompt for t in TRAIN_TEMPLATES)
            assert not any(t.split("{r}")[0] in e.prompt for t in HELDOUT_TEMPLATES)
    assert build_dataset(organism, recipe, progress=False) == data  # seeded


@pytest.mark.organism
def test_turn_recipe_ends_the_framed_thinking_with_a_turn(organism):
    """framed_thinking="turn": framed requests get the plain harm-recognising thinking and then a turn to comply;
    plain requests still get the plain thinking and a refusal."""
    recipe = OrganismRecipe(n_harmful=6, n_extra_harmful=2, n_harmless=3, harmless_answer_tokens=8, framed_thinking="turn")
    data = build_dataset(organism, recipe, progress=False)
    framed = [e for e in data if e.kind == "jailbreak"]
    assert len(framed) == 6
    for e in framed:
        assert any(e.thinking == f"{h} {t}" for h in THINK_HARMFUL for t in THINK_TURN)
        assert e.answer in FORM_COMPLIANCE
    assert all(e.thinking in THINK_HARMFUL and e.answer in REFUSALS for e in data if e.kind == "harmful")
    with pytest.raises(MechcliffError, match="framed_thinking"):
        build_dataset(organism, OrganismRecipe(n_harmful=1, framed_thinking="twist"), progress=False)


@pytest.mark.unit
def test_heldout_sets_are_disjoint_from_training():
    from mechcliff.data import load_prompts

    train = {p.text for p in load_prompts(SHARED / "harmful_train.json")}
    sets = heldout_sets()
    assert not train & {p.text for p in sets["harmful"]}
    assert all(any(t.split("{r}")[0] in p.text for t in HELDOUT_TEMPLATES) for p in sets["harmful_jailbreak"])
    assert len(sets["harmless"]) == 80


@pytest.mark.unit
def test_extra_harmful_prompts_skip_held_out_and_training_prompts():
    """AdvBench shares prompts with harmful_train and the held-out sets; none of them may be trained on twice or seen."""
    from mechcliff.data import load_prompts

    adv = [_norm(p.text) for p in load_prompts(SHARED / "advbench.json")]
    heldout = {_norm(p.text) for ps in heldout_sets().values() for p in ps}
    assert heldout & set(adv)  # the overlap this guards against is real


@pytest.mark.unit
def test_run_config_uses_held_out_sets_for_the_learned_organism():
    from mechcliff.pipeline import Run, RunConfig

    cfg = RunConfig.from_dict({"model": "smollm2-refusal-organism"})
    assert cfg.prompts == {g: f"heldout:{g}" for g in ("harmless", "harmful", "harmful_jailbreak")}
    assert cfg.ablation_top_k is None and cfg.n_random_sets == 5  # 3% of 270 heads = 8
    groups = Run("/nonexistent-run-dir-not-created", cfg).prompt_groups()
    sets = heldout_sets()
    assert {g: [p.text for p in ps] for g, ps in groups.items()} == {g: [p.text for p in ps] for g, ps in sets.items()}
    quick = RunConfig.from_dict({"model": "smollm2-refusal-organism", "quick": True})
    assert quick.prompts == cfg.prompts and quick.n_per_group is None and quick.max_think_tokens == 48
    builtin_quick = RunConfig.from_dict({"model": "organism", "quick": True})  # real-model quick defaults stay off it
    assert builtin_quick.n_per_group is None and builtin_quick.ablation_top_k == 3
    bad = RunConfig.from_dict({"model": "organism", "prompts": {"harmless": "heldout:nope", "harmful": ""}})
    with pytest.raises(MechcliffError, match="unknown held-out set 'nope'"):
        Run("/nonexistent-run-dir-not-created", bad).prompt_groups()


@pytest.mark.unit
def test_probe_groups_option():
    """The probe's training pool is configurable (attempt 5 of the study fits it on all three groups)."""
    from mechcliff.pipeline import Run, RunConfig

    assert RunConfig.from_dict({"model": "organism"}).probe_groups == ["harmless", "harmful"]
    with pytest.raises(MechcliffError, match="probe_groups"):
        RunConfig.from_dict({"model": "organism", "probe_groups": []})
    cfg = RunConfig.from_dict({"model": "organism", "probe_groups": ["harmless", "harmful_jailbreak"]})
    with pytest.raises(MechcliffError, match=r"probe_groups \['harmful_jailbreak'\] are not among"):
        Run("/nonexistent-run-dir-not-created", cfg)._fit_probe({"harmless": [], "harmful": []})


@pytest.mark.unit
def test_install_adapter_rewrites_the_base_path(tmp_path):
    import json

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/root/.cache/x", "r": 8}))
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (run / "recipe.json").write_text("{}")
    dest = install_adapter(run, tmp_path / "res")
    assert json.loads((dest / "adapter_config.json").read_text()) == {"base_model_name_or_path": "smollm2-135m-instruct", "r": 8}
    assert (dest / "adapter_model.safetensors").read_bytes() == b"weights" and (dest / "recipe.json").exists()
    with pytest.raises(MechcliffError, match="no trained organism"):
        install_adapter(tmp_path / "empty", tmp_path / "res2")


@pytest.mark.unit
def test_missing_builtin_adapter_is_a_clear_error(monkeypatch, tmp_path):
    from mechcliff.model import loading

    monkeypatch.setitem(loading.FINETUNED_ALIASES, "smollm2-refusal-organism", ("smollm2-135m-instruct", tmp_path))
    with pytest.raises(MechcliffError, match="needs its adapter"):
        loading.load_hf_model("smollm2-refusal-organism")
