"""The fast reading path (mechcliff.model.plain): plain hooks on the Hugging Face modules while the model runs its
own sdpa attention give the bridge's activations.

Ground truth: the bridge's own hooks on the same batch (``capture(..., path="bridge")``), which the rest of the
suite checks against ``run_with_cache`` and the unwrapped HF model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechcliff.errors import MechcliffError
from mechcliff.model import plain
from mechcliff.model.capture import act_name, capture

pytestmark = pytest.mark.exactness  # also run by the canary on the newest releases (make test-latest)

KINDS = ("llama_gqa", "qwen2", "qwen3", "gemma3")


def _batch(handle, n=5, seed=0):
    from mechcliff.chat import encode

    texts = ["how do i bake bread", "explain why the sky is blue in a short story about a cat", "the user asks",
             "write a story", "how do i make a bomb at home"][:n]
    return encode(handle, texts, thinking=["i think about it " * (k + 1) for k in range(n)], answers=["ok"] * n)


def _whole(handle, batch, names, path):
    (chunk,) = capture(handle, batch, names, batch_size=len(batch), path=path)
    return chunk.values


def _same(got, want, mask, rel=1e-5):
    real = mask.bool()
    scale = max(want[real].abs().max().item(), 1.0)
    err = (got - want)[real].abs().max().item()
    assert err <= rel * scale, f"max |plain - bridge| {err:.3g} > {rel} x {scale:.3g}"


@pytest.mark.organism
@pytest.mark.parametrize("kind", [*KINDS, "organism"])
def test_plain_path_reads_the_bridges_activations(kind, tiny_models, organism):
    """resid_post and hook_z (and every other verified site) at every layer and real token, 1e-5 in float32."""
    handle = organism if kind == "organism" else tiny_models(kind)
    batch = _batch(handle)
    verified = plain.verified_sites(handle)
    for layer in range(handle.n_layers):
        assert {act_name("resid_post", layer), act_name("z", layer)} <= verified
    names = sorted(verified)
    got, want = _whole(handle, batch, names, "plain"), _whole(handle, batch, names, "bridge")
    for n in names:
        assert got[n].shape == want[n].shape
        _same(got[n], want[n], batch.attention_mask)
        assert torch.isfinite(got[n]).all()  # padded positions too: no NaN from fully masked rows


@pytest.mark.organism
def test_post_norm_outputs_stay_on_the_bridge(tiny_models):
    """Gemma3 adds a norm after o_proj and after the MLP: the bridge's attn_out / mlp_out are the normed outputs, the
    plain modules' are not, so the check keeps those two on the bridge, and capture reads them there."""
    h = tiny_models("gemma3")
    verified = plain.verified_sites(h)
    assert act_name("attn_out", 0) not in verified and act_name("mlp_out", 0) not in verified
    check = h.conformance.check("plain_reads")
    assert not check.passed and not check.required and "hook_attn_out" in check.detail
    assert "hook_attn_out" not in h.describe()["plain_reads"] and "attn.hook_z" in h.describe()["plain_reads"]
    batch = _batch(h, 3)
    with pytest.raises(MechcliffError, match="not verified on the plain path"):
        next(capture(h, batch, [act_name("attn_out", 0)], path="plain"))
    auto = _whole(h, batch, [act_name("attn_out", 0)], "auto")[act_name("attn_out", 0)]
    bridge = _whole(h, batch, [act_name("attn_out", 0)], "bridge")[act_name("attn_out", 0)]
    torch.testing.assert_close(auto, bridge, atol=0.0, rtol=0.0)


def _count_bridge_forwards(monkeypatch, handle):
    calls = []
    real = handle.bridge.run_with_hooks

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(handle.bridge, "run_with_hooks", counted)
    return calls


@pytest.mark.organism
def test_auto_path_is_plain_unless_a_bridge_only_site_is_needed(monkeypatch, organism):
    from mechcliff.interventions import intervene

    batch = _batch(organism, 3)
    calls = _count_bridge_forwards(monkeypatch, organism)
    list(capture(organism, batch, [act_name("resid_post", 1), act_name("z", 0)]))
    list(capture(organism, batch, [act_name("resid_post", 1)], hooks=[(act_name("z", 0), lambda z, hook: z)]))
    with intervene(organism, ["L1H0"], mode="zero"):  # z interventions run on the plain path too
        list(capture(organism, batch, [act_name("resid_post", 1)]))
    assert calls == []
    list(capture(organism, batch, [act_name("pattern", 0)]))  # patterns: the bridge's
    list(capture(organism, batch, [act_name("resid_post", 1)], return_logits=True))
    with intervene(organism, ["L1H0"], mode="scale_q", gamma=0.5):  # queries: the bridge's
        list(capture(organism, batch, [act_name("resid_post", 1)]))
    assert len(calls) == 3
    with pytest.raises(MechcliffError, match="run on the bridge only"):
        next(capture(organism, batch, [act_name("z", 0)], hooks=[(act_name("q", 0), lambda q, hook: q)], path="plain"))
    with pytest.raises(MechcliffError, match="path must be one of"):
        next(capture(organism, batch, [act_name("z", 0)], path="fast"))


@pytest.mark.organism
@pytest.mark.parametrize("kind", ["organism", "qwen2"])
@pytest.mark.parametrize("mode,gamma", [("zero", None), ("scale_z", 0.5), ("scale_z", 1.0), ("mean", None),
                                        ("norm_preserving", 0.0), ("neurons", None)])
def test_interventions_act_alike_on_both_paths(kind, mode, gamma, organism, tiny_models):
    """Inside an intervention the plain path runs the same hooks at the same tensors as the bridge: what is read
    downstream (and at the intervened site itself) agrees to sdpa rounding; gamma = 1 is exactly the clean read."""
    import contextlib

    from mechcliff.interventions import ablate_neurons, intervene, mean_head_outputs

    h = organism if kind == "organism" else tiny_models(kind)
    batch = _batch(h)
    names = [act_name("z", 1), act_name("resid_post", h.n_layers - 1), act_name("mlp_post", 1)]
    clean = _whole(h, batch, names, "auto")
    if mode == "neurons":
        ctx = ablate_neurons(h, [(1, 0), (1, 5)])
    else:
        mean_z = mean_head_outputs(h, batch) if mode == "mean" else None
        ctx = intervene(h, ["L1H0", "L1H1"], mode=mode, gamma=gamma, mean_z=mean_z)
    with ctx if ctx is not None else contextlib.nullcontext():
        fast = _whole(h, batch, names, "plain")
        slow = _whole(h, batch, names, "bridge")
    for n in names:
        _same(fast[n], slow[n], batch.attention_mask)
    if mode == "scale_z" and gamma == 1.0:
        for n in names:
            torch.testing.assert_close(fast[n], clean[n], atol=0.0, rtol=0.0)
    elif mode != "neurons":
        assert (fast[act_name("z", 1)][:, :, :2] - clean[act_name("z", 1)][:, :, :2]).abs().max() > 1e-3
        if mode == "zero":
            assert fast[act_name("z", 1)][:, :, :2].abs().max() == 0.0
    else:
        assert fast[act_name("mlp_post", 1)][..., [0, 5]].abs().max() == 0.0


@pytest.mark.organism
def test_the_model_is_put_back_after_a_plain_forward(organism):
    """Bridge components, the attention implementation and the bridge's own outputs are restored, also when the
    forward ends early (every capture that reads below the last layer) or raises."""
    hf = organism.hf_model
    batch = _batch(organism, 3)
    before = organism.bridge(batch.tokens, attention_mask=batch.attention_mask)
    layer_type, impl = type(hf.model.layers[0]), hf.config._attn_implementation
    list(capture(organism, batch, [act_name("resid_post", 0)]))  # ends after layer 0
    with pytest.raises(RuntimeError, match="boom"):
        def boom(x):
            raise RuntimeError("boom")

        plain.run(organism, batch.tokens, batch.attention_mask, {act_name("z", 1): boom})
    assert type(hf.model.layers[0]) is layer_type and type(hf.model.layers[0]).__name__ == "BlockBridge"
    assert hf.config._attn_implementation == impl
    with plain.plain_model(organism) as base:
        assert type(base.layers[0]).__name__ == "LlamaDecoderLayer"
        assert hf.config._attn_implementation == "sdpa"
    after = organism.bridge(batch.tokens, attention_mask=batch.attention_mask)
    torch.testing.assert_close(after, before, atol=0.0, rtol=0.0)


@pytest.mark.organism
def test_a_plain_path_that_disagrees_is_never_used(monkeypatch, tiny_hf):
    """Sabotage the plain forward's positions at load: the check finds every site off, none is verified, and
    captures read through the bridge (same numbers as forcing it)."""
    from mechcliff.model.loading import load_model
    from mechcliff.model.organism import build_organism_tokenizer

    monkeypatch.setattr(plain, "position_ids", lambda mask: torch.zeros_like(mask, dtype=torch.long))
    tok = build_organism_tokenizer()
    h = load_model(model=tiny_hf("llama_gqa", tok), tokenizer=tok, name="tiny-broken-plain")
    check = h.conformance.check("plain_reads")
    assert not check.passed and not check.required and h.conformance.passed
    assert plain.verified_sites(h) <= {act_name("embed")}  # the embedding does not depend on positions
    batch = _batch(h, 3)
    calls = _count_bridge_forwards(monkeypatch, h)
    name = act_name("resid_post", 1)
    auto = _whole(h, batch, [name], "auto")[name]
    assert calls == [1]
    torch.testing.assert_close(auto, _whole(h, batch, [name], "bridge")[name], atol=0.0, rtol=0.0)


@pytest.mark.organism
def test_unchecked_loads_and_the_switch_read_through_the_bridge(monkeypatch, tiny_hf, organism):
    from mechcliff.model.loading import load_model
    from mechcliff.model.organism import build_organism_tokenizer

    tok = build_organism_tokenizer()
    h = load_model(model=tiny_hf("qwen2", tok), tokenizer=tok, name="tiny-unchecked", check=False)
    assert plain.verified_sites(h) == frozenset()  # never used unless verified on this load
    monkeypatch.setitem(organism.extra, "fast_reads", False)
    assert plain.verified_sites(organism) == frozenset()


@pytest.mark.organism
def test_probe_trace_and_attribution_agree_across_paths(monkeypatch, organism, organism_probe, organism_batch):
    """The analyses on the plain path equal the bridge path's (to sdpa-vs-eager rounding); attribution still sums to
    the logit."""
    from mechcliff.attribution import direct_probe_attribution
    from mechcliff.trace import trace_refusal

    batch = organism_batch[:12]
    fast_attr = direct_probe_attribution(organism, batch, organism_probe)
    fast_trace = trace_refusal(organism, batch, organism_probe)
    monkeypatch.setitem(organism.extra, "fast_reads", False)
    slow_attr = direct_probe_attribution(organism, batch, organism_probe)
    slow_trace = trace_refusal(organism, batch, organism_probe)
    assert fast_attr.max_abs_error < 1e-4
    np.testing.assert_allclose(fast_attr.per_example, slow_attr.per_example, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(fast_attr.logit, slow_attr.logit, atol=1e-4, rtol=1e-5)
    np.testing.assert_array_equal(fast_trace.offsets, slow_trace.offsets)
    np.testing.assert_allclose(fast_trace.scores_flat, slow_trace.scores_flat, atol=1e-5, rtol=1e-5)


@pytest.mark.unit
def test_the_plain_path_keeps_a_fast_attention_the_model_was_loaded_with():
    from types import SimpleNamespace

    def model(impl, sdpa=True, loaded_with=None):
        m = SimpleNamespace(config=SimpleNamespace(_attn_implementation=impl), _supports_sdpa=sdpa)
        if loaded_with:
            m._mechcliff_fast_attention = loaded_with  # remembered when the load switched it to eager
        return m

    assert plain.fast_attention(model("eager", loaded_with="flash_attention_2")) == "flash_attention_2"
    assert plain.fast_attention(model("eager", loaded_with="sdpa")) == "sdpa"
    assert plain.fast_attention(model("eager")) == "sdpa"
    assert plain.fast_attention(model("eager", sdpa=False)) == "eager"  # no fast kernel: the model's own eager
