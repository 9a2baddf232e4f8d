"""Rollout generation: batching invariance, budget-forced closing, seeded sampling, thinking-off."""

from __future__ import annotations

import pytest

from mechcliff.data import Prompt
from mechcliff.errors import MechcliffError
from mechcliff.generation import encode_rollouts, generate_rollouts

pytestmark = [pytest.mark.organism, pytest.mark.exactness]  # also run by the canary on the newest releases (make test-latest)


@pytest.fixture(scope="module")
def mixed_prompts(builtin):
    """Two prompts of each group, of different lengths (so batches are padded)."""
    out = []
    for g in ("harmless", "harmful", "harmful_jailbreak"):
        out += [p for p in builtin if p.group == g][:2]
    assert len({len(p.text) for p in out}) > 1
    return out


def _strings(rollouts):
    return [(r.prompt, r.thinking, r.response, r.meta["closed_by_model"]) for r in rollouts]


@pytest.mark.parametrize("kind", ["organism", "llama_gqa"])
def test_greedy_batched_equals_one_at_a_time(kind, organism, tiny_models, mixed_prompts):
    h = organism if kind == "organism" else tiny_models(kind)
    kw = dict(max_think_tokens=12, max_answer_tokens=10, progress=False) if kind != "organism" else dict(progress=False)
    batched = generate_rollouts(h, mixed_prompts, batch_size=len(mixed_prompts), **kw)
    single = generate_rollouts(h, mixed_prompts, batch_size=1, **kw)
    assert _strings(batched) == _strings(single)
    assert any(r.response for r in batched)


def test_rollouts_keep_input_order_and_metadata(organism_rollouts, builtin):
    assert [r.prompt for r in organism_rollouts] == [p.text for p in builtin]
    for r, p in zip(organism_rollouts, builtin):
        assert (r.group, r.category, r.id) == (p.group, p.category, p.id)
        assert r.has_think_close is True
        assert r.meta["answer_ended"] is True
        assert r.meta["temperature"] == 0.0 and r.meta["seed"] == 0


def test_plain_string_prompts(organism):
    rolls = generate_rollouts(organism, ["how do i bake bread at home"], progress=False)
    assert len(rolls) == 1 and rolls[0].group is None
    assert rolls[0].response.startswith("sure")


def test_unclosed_thinking_is_force_closed(tiny_models, mixed_prompts):
    h = tiny_models("llama_gqa")
    tok = h.tokenizer
    rolls = generate_rollouts(h, mixed_prompts, max_think_tokens=3, max_answer_tokens=4, progress=False)
    assert any(r.thinking for r in rolls)
    for r in rolls:
        assert r.meta["closed_by_model"] is False, r.thinking
        assert r.has_think_close is True  # closed by us ("budget forcing")
        assert len(tok(r.thinking, add_special_tokens=False)["input_ids"]) <= 3
        assert h.think.close_tag not in r.thinking
    batch = encode_rollouts(h, rolls)
    close_id = tok.convert_tokens_to_ids("</think>")
    te = batch.position("think_end")
    for i in range(len(batch)):
        assert te[i] >= 0
        closing = batch.tokens[i, slice(*batch.spans[i]["closing"])].tolist()
        assert closing == tok(h.think.closer, add_special_tokens=False)["input_ids"]
        assert close_id in closing


def test_seeded_sampling_is_reproducible(tiny_models, mixed_prompts):
    h = tiny_models("qwen2")
    kw = dict(max_think_tokens=8, max_answer_tokens=6, temperature=1.0, progress=False)
    a = generate_rollouts(h, mixed_prompts, seed=7, **kw)
    b = generate_rollouts(h, mixed_prompts, seed=7, **kw)
    c = generate_rollouts(h, mixed_prompts, seed=8, **kw)
    assert _strings(a) == _strings(b)
    assert _strings(a) != _strings(c)
    assert all(r.meta["temperature"] == 1.0 and r.meta["seed"] == 7 for r in a)


def test_sampling_does_not_depend_on_global_rng(tiny_models, mixed_prompts):
    import torch

    h = tiny_models("qwen2")
    kw = dict(max_think_tokens=8, max_answer_tokens=6, temperature=1.0, progress=False, seed=3)
    torch.manual_seed(123)
    a = generate_rollouts(h, mixed_prompts, **kw)
    torch.manual_seed(456)
    b = generate_rollouts(h, mixed_prompts, **kw)
    assert _strings(a) == _strings(b)


def test_thinking_off(organism, mixed_prompts):
    rolls = generate_rollouts(organism, mixed_prompts, enable_thinking=False, progress=False)
    for r in rolls:
        assert r.thinking is None
        assert r.meta["enable_thinking"] is False
        assert r.response  # the model still answers
    batch = encode_rollouts(organism, rolls, enable_thinking=False)
    close_id = organism.tokenizer.convert_tokens_to_ids("</think>")
    te = batch.position("think_end")
    for i in range(len(batch)):
        assert batch.tokens[i, te[i]].item() == close_id


def test_empty_prompt_list(organism):
    with pytest.raises(MechcliffError, match="empty prompt set"):
        generate_rollouts(organism, [], progress=False)


def test_empty_prompt_text(organism):
    with pytest.raises(MechcliffError):
        generate_rollouts(organism, [Prompt(text="   ")], progress=False)
