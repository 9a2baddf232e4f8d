"""Activation patching: the batched, prefix-reusing engine equals the one-forward-per-index reference."""

from __future__ import annotations

import numpy as np
import pytest

from mechcliff.chat import encode
from mechcliff.errors import MechcliffError
from mechcliff.patching import (LogitDiffMetric, PatchingResult, ProbeMetric, RefusalLogOddsMetric, patch_heads,
                                patch_heads_reference)
from mechcliff.probe import LinearProbe

pytestmark = [pytest.mark.organism, pytest.mark.exactness]  # also run by the canary on the newest releases (make test-latest)

# Ragged on purpose: different prompt and thinking lengths, so rows are left-padded differently.
PROMPTS = ["how do i bake bread", "write a short story about a cat who learns to swim today", "explain the sky",
           "plan a healthy week of meals for a busy person"]
THINKING = ["the user asks", "the user asks for something harmless and ordinary", "ok", "the user asks for"]


def _pair(handle):
    target = encode(handle, PROMPTS, thinking=THINKING)
    source = encode(handle, PROMPTS[::-1], thinking=THINKING[::-1], answers=["sure", "", "sorry i cannot", ""])
    return target, source


def _random_probe(handle, layer):
    """A random direction scaled so that the probe logit is O(1): the 1e-5 tolerance is then float32-meaningful."""
    w = np.random.default_rng(layer).standard_normal(handle.d_model)
    w *= 0.05 / np.linalg.norm(w)
    return LinearProbe(w=w, b=0.1, layer=layer, model_id=handle.model_id, model_hash=handle.model_hash)


@pytest.mark.parametrize("kind", ["organism", "llama_gqa", "qwen2", "qwen3"])
def test_engine_equals_reference_on_ragged_left_padded_batches(kind, organism, tiny_models):
    h = organism if kind == "organism" else tiny_models(kind)
    target, source = _pair(h)
    assert len(set(target.pad_lengths)) > 1 and len(set(source.pad_lengths)) > 1
    tok = h.tokenizer
    metrics = [ProbeMetric(_random_probe(h, h.n_layers - 1)), ProbeMetric(_random_probe(h, 0)),
               LogitDiffMetric(tok.convert_tokens_to_ids("sorry"), tok.convert_tokens_to_ids("sure")),
               RefusalLogOddsMetric([tok.convert_tokens_to_ids("sorry"), tok.convert_tokens_to_ids("i")])]
    for metric in metrics:
        ref = patch_heads_reference(h, target, source, metric)
        for max_rows in (len(target), 3 * len(target), 64):  # one head per forward, some, whole layers
            fast = patch_heads(h, target, source, metric, max_rows=max_rows)
            np.testing.assert_allclose(fast.target, ref.target, atol=1e-5)
            np.testing.assert_allclose(fast.source, ref.source, atol=1e-5)
            upstream = ~np.isnan(ref.per_example)
            assert (upstream == ~np.isnan(fast.per_example)).all()
            np.testing.assert_allclose(fast.per_example[upstream], ref.per_example[upstream], atol=1e-5)


def test_probe_metric_only_patches_heads_upstream_and_matches_unpatched_when_source_is_target(organism):
    target, _ = _pair(organism)
    probe = _random_probe(organism, 1)
    res = patch_heads(organism, target, target, ProbeMetric(probe))
    # patching a run with itself changes nothing
    finite = ~np.isnan(res.per_example)
    np.testing.assert_allclose(res.per_example[finite], np.broadcast_to(res.target[:, None, None], res.per_example.shape)[finite],
                               atol=1e-5)
    np.testing.assert_allclose(res.target, res.source, atol=1e-6)


def test_planted_heads_rank_first_on_the_organism(organism, organism_rollouts, organism_probe):
    from mechcliff.generation import encode_rollouts

    src = encode_rollouts(organism, [r for r in organism_rollouts if r.group == "harmful"][:8])
    tgt = encode_rollouts(organism, [r for r in organism_rollouts if r.group == "harmful_jailbreak"][:8])
    res = patch_heads(organism, tgt, src, ProbeMetric(organism_probe))
    planted = sorted(organism.ground_truth.planted_labels)
    assert sorted(res.top(3)) == planted
    assert res.source.mean() > res.target.mean()
    assert all(res.normalized[l, h] > 0.2 for l, h in organism.ground_truth.planted_suppression_heads)


def test_subset_of_heads_and_save_load(organism, tmp_path):
    target, source = _pair(organism)
    metric = ProbeMetric(_random_probe(organism, 3))
    res = patch_heads(organism, target, source, metric, heads=["L1H3", (2, 1)])
    assert np.isfinite(res.per_example[:, 1, 3]).all() and np.isfinite(res.per_example[:, 2, 1]).all()
    assert np.isnan(res.per_example[:, 0]).all()
    back = PatchingResult.load(res.save(tmp_path / "p"))
    np.testing.assert_array_equal(back.per_example, res.per_example)
    assert back.metric == "probe_logit" and back.top(2) == res.top(2)
    fig = res.plot()
    assert fig.data[0].z.shape == (organism.n_layers, organism.n_heads)


def test_bad_inputs(organism):
    target, source = _pair(organism)
    metric = ProbeMetric(_random_probe(organism, 3))
    with pytest.raises(MechcliffError, match="paired"):
        patch_heads(organism, target, encode(organism, PROMPTS[:2], thinking=THINKING[:2]), metric)
    with pytest.raises(MechcliffError, match="max_rows"):
        patch_heads(organism, target, source, metric, max_rows=2)
    with pytest.raises(MechcliffError, match="does not exist"):
        patch_heads(organism, target, source, metric, heads=["L9H0"])
    unclosed = encode(organism, PROMPTS, thinking=THINKING, has_think_close=[True, False, True, True])
    with pytest.raises(MechcliffError, match="lack the patch position"):
        patch_heads(organism, unclosed, source, metric)


@pytest.mark.parametrize("kind", ["organism", "qwen3"])
def test_both_engine_modes_equal_reference(kind, organism, tiny_models):
    """Patching at the first real token (no shared prefix: start-at-layer mode) and in the middle (KV-cache mode)."""
    h = organism if kind == "organism" else tiny_models(kind)
    target, source = _pair(h)
    metric = ProbeMetric(_random_probe(h, h.n_layers - 1))
    for t_pos, s_pos in ((0, 0), (2, 3), ("prompt_end", "think_close")):
        ref = patch_heads_reference(h, target, source, metric, target_position=t_pos, source_position=s_pos)
        fast = patch_heads(h, target, source, metric, target_position=t_pos, source_position=s_pos, max_rows=16)
        np.testing.assert_allclose(fast.per_example, ref.per_example, atol=1e-5)


def test_attribution_patching_tracks_exact_patching(organism, organism_rollouts, organism_probe, tiny_models):
    from mechcliff.generation import encode_rollouts
    from mechcliff.patching import attribution_patch_heads, rank_correlation

    src = encode_rollouts(organism, [r for r in organism_rollouts if r.group == "harmful"][:8])
    tgt = encode_rollouts(organism, [r for r in organism_rollouts if r.group == "harmful_jailbreak"][:8])
    metric = ProbeMetric(organism_probe)
    exact = patch_heads(organism, tgt, src, metric)
    approx = attribution_patch_heads(organism, tgt, src, metric)
    np.testing.assert_allclose(approx.target, exact.target, atol=1e-5)
    assert rank_correlation(exact, approx) >= 0.8
    assert sorted(approx.top(3)) == sorted(organism.ground_truth.planted_labels)


@pytest.mark.parametrize("kind", ["organism", "llama_gqa", "qwen2"])
@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "mlp_out"])
def test_position_patching_equals_reference(kind, site, organism, tiny_models, tmp_path):
    from mechcliff.patching import PositionPatchingResult, patch_positions, patch_positions_reference

    h = organism if kind == "organism" else tiny_models(kind)
    target, source = _pair(h)
    tok = h.tokenizer
    for metric in (ProbeMetric(_random_probe(h, h.n_layers - 1)),
                   LogitDiffMetric(tok.convert_tokens_to_ids("sorry"), tok.convert_tokens_to_ids("sure"))):
        ref = patch_positions_reference(h, target, source, metric, site=site, offsets=(-2, -1, 0))
        fast = patch_positions(h, target, source, metric, site=site, offsets=(-2, -1, 0), max_rows=12)
        np.testing.assert_allclose(fast.per_example, ref.per_example, atol=1e-5)
    if site == "resid_pre" and kind == "organism":
        # patching a run with itself changes nothing
        same = patch_positions(h, target, target, metric, site=site, offsets=(-2, -1, 0))
        finite = ~np.isnan(same.per_example)
        np.testing.assert_allclose(same.per_example[finite],
                                   np.broadcast_to(same.target[:, None, None], same.per_example.shape)[finite], atol=1e-5)
        back = PositionPatchingResult.load(fast.save(tmp_path / "pp"))
        np.testing.assert_array_equal(back.per_example, fast.per_example)
        assert back.plot().data[0].z.shape == (h.n_layers, 3)


def test_position_patching_bad_offsets(organism):
    from mechcliff.patching import patch_positions

    target, source = _pair(organism)
    with pytest.raises(MechcliffError, match="outside"):
        patch_positions(organism, target, source, ProbeMetric(_random_probe(organism, 3)), offsets=(1,))
    with pytest.raises(MechcliffError, match="site"):
        patch_positions(organism, target, source, ProbeMetric(_random_probe(organism, 3)), site="q")


def test_memory_budget_sets_the_chunk_size(organism):
    import mechcliff.patching as pm

    target, source = _pair(organism)
    metric = ProbeMetric(_random_probe(organism, 3))
    small, large = pm.rows_for_budget(organism, target, 1.0), pm.rows_for_budget(organism, target, 1000.0)
    assert 1 <= small < large
    ref = patch_heads(organism, target, source, metric, max_rows=64)
    tight = patch_heads(organism, target, source, metric, memory_budget_mb=0.001)  # floor: one head per forward
    np.testing.assert_allclose(tight.per_example, ref.per_example, atol=1e-5)


def test_two_unpatched_forwards_and_the_cropped_cache(monkeypatch, organism):
    """The engine runs the source once and the target once before patching; the target's cache, cropped to the
    prefix, holds the keys and values of the prefix's own forward."""
    import torch

    import mechcliff.patching as pm

    target, source = _pair(organism)
    metric = ProbeMetric(_random_probe(organism, 3))
    tpos = target.position("think_end")
    P = int(tpos.min())
    _, cropped = pm._target_run(organism, target, tpos, metric, P)
    own = pm._prefix_cache(organism, target, P)
    assert cropped.get_seq_length() == own.get_seq_length() == P
    real = target.attention_mask[:, :P].bool()  # [batch, pos]; padding is masked out of every attention
    for a, b in zip(cropped.layers, own.layers):
        for x, y in ((a.keys, b.keys), (a.values, b.values)):  # [batch, kv_head, pos, d_head]
            torch.testing.assert_close(x.transpose(1, 2)[real], y.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
    full = []
    run = pm.forward

    def counted(handle, inputs, *a, **k):
        if not k.get("past_key_values") and "start_at_layer" not in k:
            full.append(inputs.shape[1])
        return run(handle, inputs, *a, **k)

    monkeypatch.setattr(pm, "forward", counted)
    patch_heads(organism, target, source, metric, max_rows=64)
    assert sorted(full) == sorted([target.tokens.shape[1], source.tokens.shape[1]])  # source (z and metric) and target (metric and cache); the rest recompute the suffix


def test_the_budget_knows_the_dtype(organism):
    import mechcliff.patching as pm

    class Half:
        def __getattr__(self, name):
            return getattr(organism, name)

        dtype = __import__("torch").bfloat16

    target, _ = _pair(organism)
    f32, bf16 = pm.rows_for_budget(organism, target, 64.0), pm.rows_for_budget(Half(), target, 64.0)
    assert f32 < bf16 <= 2 * f32 + 1  # half the bytes per cached value: more rows in the same budget
