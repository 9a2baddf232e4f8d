"""Token budgets at reasoning scale (issue 17 item 6): real models think for up to 4,096 tokens and answer in up to
512, in a full ``mechcliff run`` and in ``generate_rollouts``; ``quick`` runs and the two organisms keep short
budgets (their results are unchanged); ``--help`` says so."""

from __future__ import annotations

import re

import pytest

from mechcliff.model.presets import ORGANISM_BUDGETS, generation_budgets
from mechcliff.pipeline import RunConfig, default_config

ORGANISMS = ("organism", "smollm2-refusal-organism")
REAL = ("smollm2-135m-instruct", "/models/DeepSeek-R1-Distill-Qwen-7B", "deepseek-ai/DeepSeek-R1", "x.gguf")


def _budgets(cfg: RunConfig) -> tuple[int, int]:
    return cfg.max_think_tokens, cfg.max_answer_tokens


@pytest.mark.unit
@pytest.mark.parametrize("model", REAL)
def test_real_models_run_at_reasoning_scale_and_quick_runs_stay_short(model):
    assert _budgets(default_config(model)) == (4096, 512)
    assert _budgets(default_config(model, quick=True)) == (32, 24)
    assert _budgets(RunConfig.from_dict({"model": model})) == (4096, 512)  # a config file without budgets
    assert _budgets(RunConfig.from_dict({"model": model, "quick": True})) == (32, 24)
    assert _budgets(RunConfig.from_dict({"model": model, "max_think_tokens": 100})) == (100, 512)


@pytest.mark.unit
@pytest.mark.parametrize("model", ORGANISMS)
@pytest.mark.parametrize("quick", [False, True])
def test_the_organisms_keep_their_short_budgets(model, quick):
    """48 / 32, what their runs (make demo, the learned organism's study) always used: their results are unchanged."""
    assert _budgets(default_config(model, quick=quick)) == (48, 32) == _budgets(RunConfig())


@pytest.mark.unit
def test_generate_rollouts_budgets_come_from_the_model():
    class Handle:
        def __init__(self, model_id, extra=None):
            self.model_id, self.extra = model_id, extra or {}

    assert ORGANISM_BUDGETS == (64, 48)  # generate_rollouts' defaults before real models got their own
    for m in ORGANISMS:
        assert generation_budgets(m) == generation_budgets(Handle(m)) == (64, 48)
        # a copy with heads folded into its weights (mechcliff.folding) keeps its source model's budgets
        assert generation_budgets(Handle(f"{m} (folded)", {"folded": {"source_model": m}})) == (64, 48)
    for m in (*REAL, "custom", None):
        assert generation_budgets(m) == generation_budgets(Handle(m)) == (4096, 512)
    assert generation_budgets("organism", 0, None) == (0, 48)  # what the caller gives is kept
    assert generation_budgets("smollm2-135m-instruct", None, 7) == (4096, 7)


@pytest.mark.unit
def test_sweep_settings_fill_in_the_models_budgets():
    """A sweep's cached cells are keyed by the budgets the model ran with: ``{}`` is the explicit defaults."""
    from mechcliff.sweep import generation_settings

    class Handle:
        model_id, extra = "organism", {}

    organism = generation_settings({}, Handle())
    assert (organism["max_think_tokens"], organism["max_answer_tokens"]) == (64, 48)
    assert organism == generation_settings({"max_think_tokens": 64, "max_answer_tokens": 48}, Handle())
    real = generation_settings({}, None)
    assert (real["max_think_tokens"], real["max_answer_tokens"]) == (4096, 512)


@pytest.mark.unit
def test_run_help_states_the_defaults_the_run_uses():
    from mechcliff.cli.run import RUN_FLAGS

    for flag, field in (("--max-think-tokens", "max_think_tokens"), ("--max-answer-tokens", "max_answer_tokens")):
        text = RUN_FLAGS[flag][2]
        real, quick, organism = (int(x) for x in re.search(
            r"Default: (\d+) on real models.*?, (\d+) with --quick, (\d+) on the organisms", text).groups())
        assert real == getattr(default_config("smollm2-135m-instruct"), field), text
        assert quick == getattr(default_config("smollm2-135m-instruct", quick=True), field), text
        assert organism == getattr(default_config("organism"), field), text


@pytest.mark.organism
def test_generate_rollouts_default_on_the_organism_is_its_old_default(organism, builtin):
    from mechcliff.generation import generate_rollouts

    prompts = [p for p in builtin if p.group == "harmful_jailbreak"][:2] + [p for p in builtin if p.group == "harmless"][:2]
    implicit = generate_rollouts(organism, prompts, progress=False)
    explicit = generate_rollouts(organism, prompts, max_think_tokens=64, max_answer_tokens=48, progress=False)
    assert [(r.thinking, r.response) for r in implicit] == [(r.thinking, r.response) for r in explicit]


@pytest.mark.organism
def test_generate_rollouts_default_on_a_real_model_is_reasoning_scale(tiny_hf):
    """A model the presets do not name gets 4,096 + 512 tokens: on a 64-token context the budgets are cut to fit,
    and the warning names the budgets asked for (no 4,096 tokens are generated)."""
    from mechcliff.generation import ContextLengthWarning, generate_rollouts
    from mechcliff.model.loading import load_model
    from mechcliff.model.organism import build_organism_tokenizer

    tok = build_organism_tokenizer()
    hf = tiny_hf("llama_gqa", tok)
    hf.config.max_position_embeddings = 64
    h = load_model(model=hf, tokenizer=tok, name="tiny-real", check=False)
    with pytest.warns(ContextLengthWarning, match=r"thinking 4096 \+ answer 512 > 64"):
        rolls = generate_rollouts(h, ["give me one recipe"], progress=False)
    capped = rolls[0].meta["context_capped"]
    assert capped["prompt_tokens"] + capped["max_think_tokens"] + capped["max_answer_tokens"] == 64
    assert capped["max_answer_tokens"] > ORGANISM_BUDGETS[1]  # not the organism's 48


@pytest.mark.unit
def test_the_studies_keep_their_own_short_budgets_on_the_organisms():
    """compare-modes, refusal heads, neurons (48 / 32) and the CoT studies (64 / 16) keep their organism budgets;
    real models get reasoning-scale ones; given budgets win."""
    for model in ORGANISMS:
        assert generation_budgets(model, short=(48, 32)) == (48, 32)
        assert generation_budgets(model, short=(64, 16)) == (64, 16)
    for model in REAL:
        assert generation_budgets(model, short=(48, 32)) == (4096, 512)
    assert generation_budgets("organism", 7, None, short=(48, 32)) == (7, 32)


@pytest.mark.unit
def test_the_study_commands_say_their_defaults(capsys):
    from mechcliff.cli import main

    for command, think in (("compare-modes", "48"), ("refusal-heads", "48"), ("neurons", "48"),
                           ("safety-layers", "64"), ("spectral", "64")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "4096 on real models" in text and f"{think} on the organisms" in text, command


@pytest.mark.organism
def test_a_study_on_a_real_model_asks_for_reasoning_scale_budgets(monkeypatch, organism, builtin):
    """The study functions resolve their None budgets through the model's preset before generating."""
    import mechcliff.generation as generation
    from mechcliff.safety_layers import prepare_groups

    seen = []

    def fake(handle, prompts, **kw):
        seen.append((kw["max_think_tokens"], kw["max_answer_tokens"]))
        raise RuntimeError("stop")

    monkeypatch.setattr(generation, "generate_rollouts", fake)
    for name, want in (("organism", (64, 16)), ("some-real-model", (4096, 512))):
        monkeypatch.setattr(organism, "model_id", name)
        with pytest.raises(RuntimeError, match="stop"):
            prepare_groups(organism, builtin[:1], builtin[:1])
        assert seen[-1] == want
