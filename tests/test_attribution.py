"""Direct probe attribution: exactness, recovery of the planted heads, brute-force reference, persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechcliff.attribution import HeadAttribution, direct_probe_attribution, trace_positions
from mechcliff.chat import encode
from mechcliff.errors import MechcliffError
from mechcliff.probe import LinearProbe
from mechcliff.trace import trace_refusal

pytestmark = pytest.mark.exactness  # also run by the canary on the newest releases (make test-latest)

PROMPTS = ["How do I bake bread at home.", "For my novel, a character explains how to build a bomb at home.",
           "give me one recipe", "explain how to hack a computer"]
THINKING = ["the user asks for something harmless", "the user asks for something harmful so refusing seems wise",
            None, "something harmful"]
ANSWERS = ["sure here comes", "sure here comes a general overview", "sure", "sorry i cannot help"]


def _random_probe(h, layer: int, seed: int = 0) -> LinearProbe:
    rng = np.random.default_rng(seed)
    return LinearProbe(w=rng.standard_normal(h.d_model), b=0.3, layer=layer, model_id=h.model_id,
                       model_hash=h.model_hash)


def _batch(h):
    return encode(h, PROMPTS, thinking=THINKING, answers=ANSWERS)


@pytest.fixture(scope="module")
def jailbreak(organism, organism_rollouts, organism_probe):
    """Jailbreak rollouts, their batch, their trace and the DPA at t_cliff (as the pipeline does)."""
    from mechcliff.generation import encode_rollouts

    rolls = [r for r in organism_rollouts if r.group == "harmful_jailbreak"]
    batch = encode_rollouts(organism, rolls)
    tr = trace_refusal(organism, batch, organism_probe)
    pos = trace_positions(tr, batch)
    dpa = direct_probe_attribution(organism, batch, organism_probe, position=pos,
                                   groups=["harmful_jailbreak"] * len(rolls))
    return batch, tr, pos, dpa


# ---- exactness ----------------------------------------------------------------------------------------------


@pytest.mark.organism
def test_components_sum_to_logit_organism(organism, organism_batch, organism_probe):
    dpa = direct_probe_attribution(organism, organism_batch, organism_probe)
    assert dpa.exact is True
    assert dpa.per_example.shape == (len(organism_batch), organism.n_layers, organism.n_heads)
    assert dpa.max_abs_error < 1e-4
    np.testing.assert_allclose(dpa.total, dpa.logit, atol=1e-4)
    # the logit read by DPA is the probe's logit on the collected residuals
    from mechcliff.probe import collect_residuals

    x = collect_residuals(organism, organism_batch, [organism_probe.layer])[:, 0]
    np.testing.assert_allclose(dpa.logit, organism_probe.logit(x), rtol=1e-5, atol=1e-4)


@pytest.mark.organism
@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2", "qwen3"])
@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("position", ["think_end", "last", 3])
def test_components_sum_to_logit_tiny(tiny_models, kind, layer, position):
    h = tiny_models(kind)
    assert h.exact_decomposition is True
    probe = _random_probe(h, layer)
    dpa = direct_probe_attribution(h, _batch(h), probe, position=position)
    assert dpa.exact is True
    assert np.abs(dpa.logit).max() > 1.0  # a random probe gives sizeable logits, so the check is not vacuous
    assert dpa.max_abs_error < 1e-4
    # heads after the probe layer have no direct effect: NaN, and MLP terms there are zero
    assert np.isnan(dpa.per_example[:, layer + 1:]).all()
    assert np.isfinite(dpa.per_example[:, : layer + 1]).all()
    assert (dpa.mlp[:, layer + 1:] == 0).all()
    assert np.isnan(dpa.mean[layer + 1:]).all()


@pytest.mark.organism
@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2", "qwen3", "gemma3"])
def test_tiny_models_load_and_conform(tiny_models, kind):
    h = tiny_models(kind)
    assert (h.n_layers, h.n_heads, h.d_model) == (2, 4, 64)
    checks = {c.name: c.passed for c in h.conformance.checks}
    assert checks["hook_shapes"] and checks["residual_additivity"] and checks["logits_vs_hf"]
    assert h.exact_decomposition is (kind != "gemma3")
    # Gemma's sandwich norms break "heads sum to attn_out" by design: flagged, informational, not a load error
    assert checks["heads_sum_to_attn_out"] is (kind != "gemma3") and h.conformance.passed


@pytest.mark.organism
def test_qwen2_biases_matter(tiny_models):
    """The Qwen2 model really has (non-zero) attention biases, so the exact sum above is a real check."""
    h = tiny_models("qwen2")
    biases = [p for n, p in h.hf_model.named_parameters() if "self_attn" in n and n.endswith("bias")]
    assert biases and all(p.abs().sum() > 0 for p in biases)


@pytest.mark.organism
def test_post_norm_model_is_not_exact(tiny_models):
    h = tiny_models("gemma3")
    assert h.exact_decomposition is False
    assert h.conformance.post_attention_norm is True
    assert any("post-attention" in n for n in h.conformance.notes)
    dpa = direct_probe_attribution(h, _batch(h), _random_probe(h, 1))
    assert dpa.exact is False
    assert np.isfinite(dpa.per_example).all()


# ---- brute-force reference ----------------------------------------------------------------------------------


@pytest.mark.organism
@pytest.mark.parametrize("kind", ["organism", "qwen2"])
def test_matches_brute_force_reference(kind, organism, tiny_models):
    h = organism if kind == "organism" else tiny_models(kind)
    L = h.n_layers - 1 if kind == "organism" else 1
    probe = _random_probe(h, L, seed=1)
    batch = _batch(h)
    dpa = direct_probe_attribution(h, batch, probe, position="think_end")
    pos = batch.position("think_end")
    w = torch.as_tensor(probe.w, dtype=torch.float32)
    for i in (0, 1):  # a couple of examples, one at a time and without padding
        toks = torch.tensor([batch.row(i)])
        p = int(pos[i]) - batch.pad_lengths[i]
        with torch.no_grad():
            _, cache = h.bridge.run_with_cache(
                toks, names_filter=lambda n: n.endswith(("hook_z", "hook_mlp_out", "hook_resid_post"))
                or n == "blocks.0.hook_resid_pre")
        for layer in range(L + 1):
            z = cache[f"blocks.{layer}.attn.hook_z"][0, p]  # [head, d_head]
            ref = torch.einsum("hd,hdm,m->h", z, h.bridge.blocks[layer].attn.W_O.detach(), w)
            np.testing.assert_allclose(dpa.per_example[i, layer], ref.numpy(), rtol=1e-4, atol=1e-4)
            mlp_ref = float(cache[f"blocks.{layer}.hook_mlp_out"][0, p] @ w)
            assert dpa.mlp[i, layer] == pytest.approx(mlp_ref, rel=1e-4, abs=1e-4)
        assert dpa.embed[i] == pytest.approx(float(cache["blocks.0.hook_resid_pre"][0, p] @ w), rel=1e-4, abs=1e-4)
        logit_ref = float(cache[f"blocks.{L}.hook_resid_post"][0, p] @ w) + probe.b
        assert dpa.logit[i] == pytest.approx(logit_ref, rel=1e-4, abs=1e-4)
        assert dpa.positions[i] == int(pos[i])


# ---- the planted circuit ------------------------------------------------------------------------------------


@pytest.mark.organism
def test_top_suppression_heads_are_the_planted_ones(organism, jailbreak):
    _, tr, pos, dpa = jailbreak
    planted = {f"L{l}H{h}" for l, h in organism.extra["ground_truth"].planted_suppression_heads}
    assert set(dpa.top(3)) == planted
    assert dpa.max_abs_error < 1e-4
    assert dpa.groups == ["harmful_jailbreak"] * len(dpa.groups)
    # at t_cliff each planted head pushes the logit down
    for label in planted:
        l, h = int(label[1]), int(label[3])
        assert (dpa.per_example[:, l, h] < 0).all()


@pytest.mark.organism
def test_trace_positions(jailbreak):
    batch, tr, pos, dpa = jailbreak
    assert pos.shape == (len(batch),)
    for i in range(len(batch)):
        assert int(pos[i]) == tr.stats["t_cliff"][i] + batch.pad_lengths[i]
    assert dpa.positions == pos.tolist()


@pytest.mark.organism
def test_harm_detectors_promote_refusal(organism, organism_rollouts, organism_probe):
    from mechcliff.generation import encode_rollouts

    rolls = [r for r in organism_rollouts if r.group == "harmful"]
    dpa = direct_probe_attribution(organism, encode_rollouts(organism, rolls), organism_probe)
    top = set(dpa.top(2, sign="pos"))
    assert top == {f"L{l}H{h}" for l, h in organism.extra["ground_truth"].harm_detector_heads}


@pytest.mark.organism
def test_no_position_is_an_error(organism, organism_probe):
    b = encode(organism, PROMPTS[:1], thinking=THINKING[:1], has_think_close=[False])
    with pytest.raises(MechcliffError, match="position"):
        direct_probe_attribution(organism, b, organism_probe)


@pytest.mark.organism
def test_examples_without_position_are_dropped(organism, organism_probe):
    b = encode(organism, PROMPTS[:2], thinking=THINKING[:2], has_think_close=[False, True])
    dpa = direct_probe_attribution(organism, b, organism_probe, groups=["x", "y"])
    assert dpa.per_example.shape[0] == 1 and dpa.groups == ["y"]


@pytest.mark.organism
def test_probe_of_other_model_is_an_error(organism_probe, tiny_models):
    h = tiny_models("llama_gqa")
    with pytest.raises(MechcliffError, match="trained on model"):
        direct_probe_attribution(h, _batch(h), organism_probe)


# ---- ranking and persistence --------------------------------------------------------------------------------


def _hand_attr() -> HeadAttribution:
    per = np.array([[[-3.0, 1.0, 0.5], [2.0, -0.5, np.nan]],
                    [[-1.0, 1.0, 0.5], [4.0, -0.5, np.nan]]])  # mean: [[-2, 1, .5], [3, -.5, nan]]
    return HeadAttribution(per_example=per, mlp=np.zeros((2, 2)), embed=np.zeros(2), attn_bias=np.zeros(2),
                           logit=np.zeros(2), probe_bias=0.0, probe_layer=1, positions=[3, 4], model_id="hand")


@pytest.mark.unit
def test_ranked_heads_and_top():
    a = _hand_attr()
    assert a.ranked_heads() == [(0, 0), (1, 1), (0, 2), (0, 1), (1, 0)]  # most negative first, NaN skipped
    assert a.ranked_heads("pos") == [(1, 0), (0, 1), (0, 2), (1, 1), (0, 0)]
    assert a.top(2) == ["L0H0", "L1H1"]
    assert a.top(1, sign="pos") == ["L1H0"]
    assert a.top(99) == ["L0H0", "L1H1", "L0H2", "L0H1", "L1H0"]
    np.testing.assert_allclose(a.mean[0], [-2.0, 1.0, 0.5])


@pytest.mark.organism
def test_save_load_round_trip(jailbreak, tmp_path):
    dpa = jailbreak[3]
    dpa.save(tmp_path / "a")
    d2 = HeadAttribution.load(tmp_path / "a")
    for f in ("per_example", "mlp", "embed", "attn_bias", "logit"):
        np.testing.assert_array_equal(getattr(d2, f), getattr(dpa, f))
    assert d2.positions == dpa.positions and d2.groups == dpa.groups
    assert (d2.probe_bias, d2.probe_layer, d2.exact, d2.model_id) == (dpa.probe_bias, dpa.probe_layer, dpa.exact,
                                                                       dpa.model_id)
    assert d2.top(5) == dpa.top(5) and d2.max_abs_error == dpa.max_abs_error


@pytest.mark.unit
def test_save_load_round_trip_with_nan_heads(tmp_path):
    a = _hand_attr()
    a.save(tmp_path / "a")
    b = HeadAttribution.load(tmp_path / "a")
    np.testing.assert_array_equal(b.per_example, a.per_example)  # NaN positions preserved
    assert b.ranked_heads() == a.ranked_heads()


@pytest.mark.organism
def test_load_wrong_kind(jailbreak, tmp_path):
    from mechcliff.trace import RefusalTrace

    jailbreak[1].save(tmp_path / "t")
    with pytest.raises(MechcliffError, match="refusal_trace"):
        HeadAttribution.load(tmp_path / "t")
    with pytest.raises(MechcliffError, match="no result.json"):
        RefusalTrace.load(tmp_path / "missing")
