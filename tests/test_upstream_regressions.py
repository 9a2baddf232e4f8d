"""Regression tests for silent-failure bugs that TransformerLens users have reported upstream.

Each test names the upstream issue or pull request it guards and runs on the organism and the tiny random-weight
models (Llama with GQA, Qwen2 with attention biases, Qwen3 with query/key norms, Gemma3 where it makes sense).
Every check compares numbers with a reference (the same prompt alone, an uncached forward, the clean model, ...)
so that it fails when the guarded behaviour breaks; tolerances are relative to the logit scale (float32).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mechcliff.chat import encode
from mechcliff.generation import generate_rollouts
from mechcliff.interventions import intervene, mean_head_outputs
from mechcliff.probe import LinearProbe

pytestmark = pytest.mark.exactness  # also run by the canary on the newest releases (make test-latest)

KINDS = ["organism", "llama_gqa", "qwen2", "qwen3"]
ALL_KINDS = KINDS + ["gemma3"]

# Ragged on purpose: every row is left padded by a different amount, one row not at all.
PROMPTS = ["how do i bake bread", "write a short story about a cat who learns to swim today", "explain the sky",
           "plan a healthy week of meals for a busy person"]
THINKING = ["the user asks", "the user asks for something harmless and ordinary", None, "ok"]
ANSWERS = ["sure", "sure here comes", "sorry i cannot", None]

# Every hook mechcliff reads or writes (grep mechcliff for "hook_"): per layer, and global.
PER_LAYER_HOOKS = ("attn.hook_z", "attn.hook_q", "attn.hook_rot_q", "attn.hook_pattern", "hook_resid_pre",
                   "hook_resid_post", "hook_attn_out", "hook_mlp_out", "mlp.hook_post")
GLOBAL_HOOKS = ("hook_embed", "ln_final.hook_out")


# ---- helpers ------------------------------------------------------------------------------------------------


def _handle(kind, organism, tiny_models):
    return organism if kind == "organism" else tiny_models(kind)


def _batch(h, n=len(PROMPTS)):
    b = encode(h, PROMPTS[:n], thinking=THINKING[:n], answers=ANSWERS[:n])
    assert len(set(b.pad_lengths)) > 1 and min(b.pad_lengths) == 0  # really ragged
    return b


def _alone(h, i):
    return encode(h, PROMPTS[i:i + 1], thinking=THINKING[i:i + 1], answers=ANSWERS[i:i + 1])


@torch.no_grad()
def _logits(h, b):
    return h.bridge(b.tokens, attention_mask=b.attention_mask)


def _tol(ref: torch.Tensor, rel: float = 1e-5) -> float:
    return rel * max(1.0, float(ref.abs().max()))


def _assert_close(actual, expected, rel=1e-5, what=""):
    actual, expected = torch.as_tensor(actual).float(), torch.as_tensor(expected).float()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = float((actual - expected).abs().max()) if actual.numel() else 0.0
    assert err <= _tol(expected, rel), f"{what}: max |error| {err:.3g} > {_tol(expected, rel):.3g}"


def _assert_differs(a, b, rel=1e-3, what=""):
    err = float((a.float() - b.float()).abs().max())
    assert err > _tol(b, rel), f"{what}: outputs should differ but max |difference| is only {err:.3g}"


def _real(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The real-token rows of a hook tensor ([batch, pos, ...], or [batch, head, q, k] for attention patterns)."""
    return x[mask.bool()]


def _random_probe(h, layer):
    """A random direction scaled so that the probe logit is O(1) (as in tests/test_patching.py)."""
    w = np.random.default_rng(layer).standard_normal(h.d_model)
    w *= 0.05 / np.linalg.norm(w)
    return LinearProbe(w=w, b=0.1, layer=layer, model_id=h.model_id, model_hash=h.model_hash)


def _hook_names(h) -> list[str]:
    names = list(GLOBAL_HOOKS) + [f"blocks.{l}.{n}" for l in range(h.n_layers) for n in PER_LAYER_HOOKS]
    missing = [n for n in names if n not in h.bridge.hook_dict]
    assert not missing, f"hooks mechcliff uses are missing on {h.model_id}: {missing}"
    return names


def _n_hooks(bridge) -> int:
    """Hooks attached to the bridge's hook points (TransformerLens adds its own capture hooks on other modules)."""
    points = {id(hp): hp for hp in bridge.hook_dict.values()}.values()
    return sum(len(hp._forward_hooks) + len(hp._forward_pre_hooks) for hp in points)


def _greedy_generate(h, tokens, mask, n):
    """``n`` greedy tokens from ``hf_model.generate`` (KV-cached), with no early stop."""
    with torch.no_grad():
        out = h.hf_model.generate(tokens, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  temperature=None, top_p=None, top_k=None, pad_token_id=h.tokenizer.pad_token_id)
    return out[:, tokens.shape[1]:]


def _eos_ids(h) -> list[int]:
    eos = h.hf_model.generation_config.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


@torch.no_grad()
def _greedy_reference(h, tokens, mask, n):
    """The same greedy decoding without any KV cache: a full forward over the whole sequence at every step."""
    eos = _eos_ids(h)
    new = []
    for _ in range(n):
        last = h.bridge(tokens, attention_mask=mask)[:, -1].clone()
        last[:, eos] = -float("inf")  # what min_new_tokens does
        nxt = last.argmax(-1)
        new.append(nxt)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(new, 1)


# ---- 1. left-padded position ids ----------------------------------------------------------------------------


@pytest.mark.organism
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_left_padded_batch_equals_each_prompt_alone(kind, organism, tiny_models):
    """TransformerLens #1609: left-padded rows got position ids 0..n from the first pad instead of from their first
    real token, silently shifting rotary positions. A left-padded batch must give, at the real tokens, the logits
    of each prompt run alone without padding, through the bridge (with ``attention_mask``) and through the
    wrapped Hugging Face model alike; and the last-token logits of ragged prompts must match."""
    h = _handle(kind, organism, tiny_models)
    b = _batch(h)
    with torch.no_grad():
        bridged = h.bridge(b.tokens, attention_mask=b.attention_mask)
        hf = h.hf_model(b.tokens, attention_mask=b.attention_mask).logits
        # the test can fail: attending to the pads changes the padded rows
        unmasked = h.hf_model(b.tokens).logits
    last = []
    for i in range(len(b)):
        one = _alone(h, i)
        assert one.tokens[0].tolist() == b.row(i) and one.pad_lengths == [0]
        with torch.no_grad():
            alone_bridge = h.bridge(one.tokens)
            alone_hf = h.hf_model(one.tokens).logits
        pad = b.pad_lengths[i]
        _assert_close(alone_bridge[0], alone_hf[0], what=f"row {i}: bridge vs HF, unpadded")
        _assert_close(bridged[i, pad:], alone_bridge[0], what=f"row {i}: bridge, padded vs alone")
        _assert_close(hf[i, pad:], alone_hf[0], what=f"row {i}: HF, padded vs alone")
        if pad:
            _assert_differs(unmasked[i, pad:], alone_hf[0], what=f"row {i}: pads attended")
        last.append(alone_bridge[0, -1])
    _assert_close(bridged[:, -1], torch.stack(last), what="last-token logits")
    _assert_close(hf[:, -1], torch.stack(last), what="last-token logits (HF)")


# ---- 2. attention mask at every generation step -------------------------------------------------------------


@pytest.mark.organism
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_greedy_rollouts_batched_equal_one_at_a_time(kind, organism, tiny_models):
    """TransformerLens PR #1617 / #1760: the attention mask (and the positions derived from it) was dropped after
    the first generation step, so padded rows attended to their pads while decoding. Greedy rollouts of a ragged
    batch must equal the same prompts generated one at a time, token for token."""
    h = _handle(kind, organism, tiny_models)
    kw = dict(max_think_tokens=6, max_answer_tokens=5, progress=False)
    batched = generate_rollouts(h, PROMPTS, batch_size=len(PROMPTS), **kw)
    single = generate_rollouts(h, PROMPTS, batch_size=1, **kw)
    tok = h.tokenizer

    def ids(r):
        return (tok(r.thinking or "", add_special_tokens=False)["input_ids"],
                tok(r.response, add_special_tokens=False)["input_ids"], r.meta["closed_by_model"])

    assert [r.prompt for r in batched] == PROMPTS
    assert [ids(r) for r in batched] == [ids(r) for r in single]
    assert sum(len(ids(r)[0]) + len(ids(r)[1]) for r in batched) > 0  # something was generated


@pytest.mark.organism
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_hf_generate_left_padded_equals_alone_and_uncached_reference(kind, organism, tiny_models):
    """TransformerLens PR #1617 / #1760 (mask honoured at every step) and the KV cache under the bridge's wrapped
    attention: greedy ``hf_model.generate`` on a left-padded batch equals generating each prompt alone, and both
    equal greedy decoding with a full, uncached forward at every step."""
    h = _handle(kind, organism, tiny_models)
    b = encode(h, PROMPTS, open_thinking=True)
    assert len(set(b.pad_lengths)) > 1
    n = 5
    batched = _greedy_generate(h, b.tokens, b.attention_mask, n)
    reference = _greedy_reference(h, b.tokens, b.attention_mask, n)
    assert batched.tolist() == reference.tolist()
    for i in range(len(b)):
        one = encode(h, PROMPTS[i:i + 1], open_thinking=True)
        assert _greedy_generate(h, one.tokens, one.attention_mask, n).tolist() == batched[i:i + 1].tolist(), i


# ---- 3. nested hook cleanup ---------------------------------------------------------------------------------


@pytest.mark.organism
@pytest.mark.parametrize("kind", KINDS)
def test_intervention_survives_nested_run_with_hooks_and_run_with_cache(kind, organism, tiny_models):
    """TransformerLens PR #1638: a ``run_with_hooks`` / ``run_with_cache`` call (which resets hooks when it ends)
    inside a ``hooks()`` context removed the context's hooks too, silently ending an ablation early. Inside
    ``with intervene(...)`` the ablation must hold after such calls; after the block the logits are the clean ones
    exactly and no hook is left behind."""
    h = _handle(kind, organism, tiny_models)
    b = _batch(h)
    last = h.n_layers - 1
    heads = [(0, 1), (last, 2)]
    n_before = _n_hooks(h.bridge)
    clean = _logits(h, b)
    seen = {}

    def grab(x, hook):
        seen["z"] = x.detach().clone()

    with intervene(h, heads, mode="zero"):
        ablated = _logits(h, b)
        _assert_differs(ablated, clean, what="ablation")
        # a run_with_hooks on the same hook point as the ablation, and one elsewhere
        out = h.bridge.run_with_hooks(b.tokens, attention_mask=b.attention_mask,
                                      fwd_hooks=[("blocks.0.attn.hook_z", grab),
                                                 (f"blocks.{last}.hook_resid_post", lambda x, hook: None)])
        assert torch.equal(out, ablated)
        assert float(seen["z"][:, :, 1].abs().max()) == 0.0 and float(seen["z"][:, :, 0].abs().max()) > 0
        assert torch.equal(_logits(h, b), ablated), "run_with_hooks removed the intervention"
        with torch.no_grad():
            logits, cache = h.bridge.run_with_cache(b.tokens, attention_mask=b.attention_mask)
        assert torch.equal(logits, ablated)
        assert float(cache[f"blocks.{last}.attn.hook_z"][:, :, 2].abs().max()) == 0.0
        assert torch.equal(_logits(h, b), ablated), "run_with_cache removed the intervention"
        with h.bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: None)]):
            pass
        assert torch.equal(_logits(h, b), ablated), "a nested hooks() context removed the intervention"
    assert torch.equal(_logits(h, b), clean), "the intervention outlived its with block"
    assert _n_hooks(h.bridge) == n_before


@pytest.mark.organism
@pytest.mark.parametrize("kind", KINDS)
def test_nested_interventions_clean_up_only_their_own_hooks(kind, organism, tiny_models):
    """TransformerLens PR #1638: leaving an inner hook context (normally or by an exception) must remove only the
    inner hooks. Inner + outer equal one intervention on both head sets; after the inner block the outer ablation
    alone is active; after both, the model is clean."""
    h = _handle(kind, organism, tiny_models)
    b = _batch(h)
    last = h.n_layers - 1
    outer_heads, inner_heads = [(0, 1)], [(0, 2), (last, 0)]  # same hook point (layer 0) and another layer
    n_before = _n_hooks(h.bridge)
    clean = _logits(h, b)
    with intervene(h, outer_heads + inner_heads, mode="zero"):
        joint = _logits(h, b)
    with intervene(h, outer_heads, mode="zero"):
        outer = _logits(h, b)
        with intervene(h, inner_heads, mode="zero"):
            both = _logits(h, b)
        after_inner = _logits(h, b)
        with pytest.raises(RuntimeError, match="boom"):
            with intervene(h, inner_heads, mode="scale_z", gamma=3.0):
                _assert_differs(_logits(h, b), outer, what="inner amplification")
                raise RuntimeError("boom")
        after_error = _logits(h, b)
    _assert_differs(outer, clean, what="outer ablation")
    _assert_differs(joint, outer, what="inner ablation")
    _assert_close(both, joint, what="outer + inner vs one intervention")
    assert torch.equal(after_inner, outer), "leaving the inner intervention changed the outer one"
    assert torch.equal(after_error, outer), "an exception in the inner intervention changed the outer one"
    assert torch.equal(_logits(h, b), clean)
    assert _n_hooks(h.bridge) == n_before


# ---- 4. hooks declared but never firing ---------------------------------------------------------------------


@pytest.mark.unit
def test_hook_list_covers_every_hook_mechcliff_uses():
    """TransformerLens PR #1257 guard, bookkeeping: the hook-firing test below must cover every hook name that
    mechcliff's code reads or writes. A new ``hook_*`` name in mechcliff has to be added to ``PER_LAYER_HOOKS`` /
    ``GLOBAL_HOOKS`` here."""
    root = Path(__file__).resolve().parents[1] / "mechcliff"
    used = set()
    for path in list(root.glob("*.py")) + list(root.glob("model/*.py")):
        used |= set(re.findall(r"\bhook_[a-z]+(?:_[a-z]+)*", path.read_text()))
    not_hooks = {"hook_dict", "hook_name", "hook_names", "hook_shapes", "hook_points", "hook_in", "hook_out"}
    covered = {n.rsplit(".", 1)[-1] for n in PER_LAYER_HOOKS + GLOBAL_HOOKS}
    assert {"hook_z", "hook_resid_post", "hook_pattern"} <= used  # the scan works
    assert used - not_hooks <= covered, f"hooks used by mechcliff but not tested: {sorted(used - not_hooks - covered)}"


@pytest.mark.organism
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_every_hook_fires_once_per_forward_and_writes_take_effect(kind, organism, tiny_models):
    """TransformerLens PR #1257: some hook points existed in ``hook_dict`` but were never called, so reads returned
    nothing and writes were silently ignored. Every hook mechcliff uses must fire exactly once per forward through
    the bridge, and a perturbation written at it must change the logits."""
    h = _handle(kind, organism, tiny_models)
    b = _batch(h, 3)
    names = _hook_names(h)
    fired = {n: 0 for n in names}

    def counter(name):
        def count(x, hook):
            fired[name] += 1
        return count

    with h.bridge.hooks(fwd_hooks=[(n, counter(n)) for n in names]):
        clean = _logits(h, b)
    assert {n: c for n, c in fired.items() if c != 1} == {}

    def perturb(x, hook):
        return x * 1.5 + 0.1

    real = b.attention_mask.bool()
    unchanged = []
    for n in names:
        with torch.no_grad():
            out = h.bridge.run_with_hooks(b.tokens, attention_mask=b.attention_mask, fwd_hooks=[(n, perturb)])
        if float((out - clean)[real].abs().max()) <= _tol(clean, 1e-3):
            unchanged.append(n)
    assert unchanged == [], f"writing to these hooks does not change the output: {unchanged}"


@pytest.mark.organism
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_every_hook_fires_at_every_generation_step(kind, organism, tiny_models):
    """TransformerLens PR #1257, generation side: mechcliff intervenes during ``hf_model.generate`` through hooks on
    the bridge, which wraps the HF modules in place. Every hook must fire once per model call of ``generate``
    (prefill and each cached step), see at prefill the tensor the bridge's own forward sees, and a write to it
    must change the generation's scores."""
    h = _handle(kind, organism, tiny_models)
    b = encode(h, PROMPTS[:3], open_thinking=True)
    names = _hook_names(h)
    n_new = 3
    fired = {n: [] for n in names}

    def recorder(name):
        def rec(x, hook):
            fired[name].append(x.detach().clone())
        return rec

    calls = [0]

    def count_call(module, args, kwargs):
        calls[0] += 1

    handle = h.hf_model.register_forward_pre_hook(count_call, with_kwargs=True)
    try:
        with h.bridge.hooks(fwd_hooks=[(n, recorder(n)) for n in names]):
            with torch.no_grad():
                h.hf_model.generate(b.tokens, attention_mask=b.attention_mask, max_new_tokens=n_new,
                                    min_new_tokens=n_new, do_sample=False, temperature=None, top_p=None, top_k=None,
                                    pad_token_id=h.tokenizer.pad_token_id)
    finally:
        handle.remove()
    assert calls[0] == n_new
    assert {n: len(v) for n, v in fired.items() if len(v) != n_new} == {}
    # cached steps run one new token per row
    assert all(x.shape[:2] == (len(b), 1) for x in fired["blocks.0.hook_resid_pre"][1:])
    # the prefill step sees what the bridge's forward sees
    ref = {}

    def keep(name):
        def k(x, hook):
            ref[name] = x.detach().clone()
        return k

    with torch.no_grad():
        h.bridge.run_with_hooks(b.tokens, attention_mask=b.attention_mask, fwd_hooks=[(n, keep(n)) for n in names])
    for n in names:
        x, r = fired[n][0], ref[n]
        if n.endswith("hook_pattern"):
            x, r = x.transpose(1, 2), r.transpose(1, 2)  # [batch, q, head, k]: real query rows
        _assert_close(_real(x, b.attention_mask), _real(r, b.attention_mask), rel=1e-4, what=f"{n} at prefill")
    # a write at the hook reaches the generation
    def first_scores():
        with torch.no_grad():
            out = h.hf_model.generate(b.tokens, attention_mask=b.attention_mask, max_new_tokens=1, do_sample=False,
                                      temperature=None, top_p=None, top_k=None, pad_token_id=h.tokenizer.pad_token_id,
                                      output_scores=True, return_dict_in_generate=True)
        return out.scores[0]

    clean_scores = first_scores()
    unchanged = []
    for n in names:
        with h.bridge.hooks(fwd_hooks=[(n, lambda x, hook: x * 1.5 + 0.1)]):
            scores = first_scores()
        if float((scores - clean_scores).abs().max()) <= _tol(clean_scores, 1e-3):
            unchanged.append(n)
    assert unchanged == [], f"writing to these hooks does not change generation: {unchanged}"


# ---- 5. head ablation acts on the o_proj input --------------------------------------------------------------


@pytest.mark.organism
@pytest.mark.parametrize("kind", KINDS)  # not gemma3: its attention output is normed after o_proj by design
def test_head_ablation_removes_exactly_that_heads_write(kind, organism, tiny_models):
    """Head ablation must act on ``hook_z`` (the input of ``o_proj``, one slice per head), not on the projected
    output: zero-ablating head ``h`` gives ``hook_attn_out == sum over the other heads of z_h @ W_O[h] + b_O`` from
    the clean ``z``, i.e. the clean output minus exactly head ``h``'s write; zeroing a slice of ``hook_attn_out``
    instead is something else. (TransformerLens #1191 / #1317: right hook name, wrong tensor.)"""
    h = _handle(kind, organism, tiny_models)
    b = _batch(h)
    mask = b.attention_mask
    layer, head = h.n_layers - 1, 1
    zname, oname = f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_attn_out"
    store = {}

    def grab(tag):
        def g(x, hook):
            store[tag] = x.detach().clone()
        return g

    with torch.no_grad():
        clean = h.bridge.run_with_hooks(b.tokens, attention_mask=mask,
                                        fwd_hooks=[(zname, grab("z")), (oname, grab("out"))])
    z, out = store["z"], store["out"]
    W_O, b_O = h.W_O(layer).float(), h.b_O(layer).float()
    writes = torch.einsum("bphd,hdm->bphm", z.float(), W_O)  # each head's write into the residual stream
    _assert_close(_real(writes.sum(2) + b_O, mask), _real(out, mask), what="clean heads sum to attn_out")

    with intervene(h, [(layer, head)], mode="zero"):
        with torch.no_grad():
            ablated = h.bridge.run_with_hooks(b.tokens, attention_mask=mask,
                                              fwd_hooks=[(zname, grab("z_abl")), (oname, grab("out_abl"))])
    z_abl, out_abl = store["z_abl"], store["out_abl"]
    assert float(z_abl[:, :, head].abs().max()) == 0.0
    others = [k for k in range(h.n_heads) if k != head]
    _assert_close(z_abl[:, :, others], z[:, :, others], what="other heads' z")
    expected = writes[:, :, others].sum(2) + b_O
    _assert_close(_real(out_abl, mask), _real(expected, mask), what="ablated attn_out")
    _assert_close(_real(out - out_abl, mask), _real(writes[:, :, head], mask), what="removed write")
    _assert_differs(_real(out - out_abl, mask), torch.zeros(1), what="head's write")

    # mean ablation also writes at the o_proj input: the head's write becomes mean_z[h] @ W_O[h]
    mean_z = mean_head_outputs(h, b)
    with intervene(h, [(layer, head)], mode="mean", mean_z=mean_z):
        with torch.no_grad():
            h.bridge.run_with_hooks(b.tokens, attention_mask=mask, fwd_hooks=[(oname, grab("out_mean"))])
    expected_mean = expected + mean_z[layer, head].float() @ W_O[head]
    _assert_close(_real(store["out_mean"], mask), _real(expected_mean, mask), what="mean-ablated attn_out")

    # zeroing head h's slice of the projected output is not the same intervention
    d = h.d_head

    def zero_slice(x, hook):
        x = x.clone()
        x[..., head * d:(head + 1) * d] = 0.0
        return x

    with torch.no_grad():
        sliced = h.bridge.run_with_hooks(b.tokens, attention_mask=mask, fwd_hooks=[(oname, zero_slice)])
    real = mask.bool()
    _assert_differs(ablated[real], clean[real], what="ablation")
    _assert_differs(sliced[real], ablated[real], what="slice of attn_out vs head ablation")


# ---- 6. deep copies stay independent ------------------------------------------------------------------------


@pytest.mark.organism
@pytest.mark.parametrize("kind", KINDS)
def test_deepcopied_handle_is_independent_of_the_original(kind, organism, tiny_models):
    """TransformerLens PR #1770: a deep-copied bridge shared hook points / wrapped modules with its original, so
    hooks and weight edits on one leaked into the other. ``copy.deepcopy(handle)`` must give a model with the
    same clean logits whose bridge wraps its own HF model: hooks and weight changes on either side leave the
    other's logits unchanged, for the bridge's forward and for ``hf_model.generate``."""
    h = _handle(kind, organism, tiny_models)
    b = _batch(h)
    clean = _logits(h, b)
    c = copy.deepcopy(h)
    assert c.bridge is not h.bridge and c.hf_model is not h.hf_model
    assert torch.equal(_logits(c, b), clean)
    orig_storage = {p.data_ptr() for p in h.hf_model.parameters()}
    assert not orig_storage & {p.data_ptr() for p in c.hf_model.parameters()}
    assert not orig_storage & {p.data_ptr() for p in c.bridge.parameters()}
    assert {id(p) for p in c.bridge.parameters()} <= {id(p) for p in c.hf_model.parameters()}

    heads = [(0, 1), (h.n_layers - 1, 2)]
    with intervene(c, heads, mode="zero"):  # hooks on the copy
        copy_ablated = _logits(c, b)
        assert torch.equal(_logits(h, b), clean), "a hook on the copy changed the original"
        gen_orig = _greedy_generate(h, b.tokens, b.attention_mask, 3)
    _assert_differs(copy_ablated, clean, what="ablation on the copy")
    assert gen_orig.tolist() == _greedy_generate(h, b.tokens, b.attention_mask, 3).tolist()
    with intervene(h, heads, mode="zero"):  # hooks on the original
        assert torch.equal(_logits(h, b), copy_ablated)
        assert torch.equal(_logits(c, b), clean), "a hook on the original changed the copy"
    assert _n_hooks(c.bridge) == _n_hooks(h.bridge)

    # weights changed on the copy (through its HF model, which the bridge wraps)
    with torch.no_grad():
        c.hf_model.get_output_embeddings().weight.mul_(2.0)
    _assert_differs(_logits(c, b), clean, what="weight change on the copy")
    assert torch.equal(_logits(h, b), clean), "a weight change on the copy changed the original"
    # ... and on the original (restored exactly afterwards: the handle is shared by the session)
    copy_logits = _logits(c, b)
    w = h.hf_model.get_input_embeddings().weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.add_(0.5)
        _assert_differs(_logits(h, b), clean, what="weight change on the original")
        assert torch.equal(_logits(c, b), copy_logits), "a weight change on the original changed the copy"
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert torch.equal(_logits(h, b), clean)


# ---- 7. batched analyses equal per-example analyses ---------------------------------------------------------


@pytest.mark.organism
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_analyses_on_a_batch_equal_each_example_alone(kind, organism, tiny_models):
    """The batch-level consequence of TransformerLens #1609 / PR #1617: an analysis of a left-padded ragged batch
    must give each example the numbers it gets alone (unpadded): direct probe attribution, the refusal trace,
    residuals, max-pooled MLP activations, attention argmaxes and mean head outputs."""
    from mechcliff.attribution import direct_probe_attribution
    from mechcliff.neurons import maxpooled_activations
    from mechcliff.probe import collect_residuals
    from mechcliff.refusal_heads import first_token_attention
    from mechcliff.trace import trace_refusal

    h = _handle(kind, organism, tiny_models)
    b = _batch(h)
    probe = _random_probe(h, h.n_layers - 1)
    dpa = direct_probe_attribution(h, b, probe, batch_size=len(b))
    trace = trace_refusal(h, b, probe, batch_size=len(b))
    resid = collect_residuals(h, b, list(range(h.n_layers)), batch_size=len(b))
    pooled = maxpooled_activations(h, b, batch_size=len(b))
    arg, wts, qpos = first_token_attention(h, b, query="think_end", batch_size=len(b))
    if kind != "gemma3":  # sandwich norms: DPA is not exact there by design
        assert dpa.max_abs_error < 1e-4
    for i in range(len(b)):
        one, pad = _alone(h, i), b.pad_lengths[i]
        d1 = direct_probe_attribution(h, one, probe)
        assert dpa.positions[i] - pad == d1.positions[0]
        for field in ("per_example", "mlp", "embed", "logit"):
            _assert_close(getattr(dpa, field)[i], getattr(d1, field)[0], what=f"DPA {field}, row {i}")
        t1 = trace_refusal(h, one, probe)
        _assert_close(trace.example(i), t1.example(0), what=f"trace scores, row {i}")
        for key in ("plateau_mean", "plateau_max", "final", "ms", "drop", "t_cliff_rel"):
            a, e = trace.stats[key][i], t1.stats[key][0]
            assert (np.isnan(a) and np.isnan(e)) or abs(a - e) <= 1e-5, (key, i, a, e)
        _assert_close(resid[i], collect_residuals(h, one, list(range(h.n_layers)))[0], what=f"residuals, row {i}")
        _assert_close(pooled[i], maxpooled_activations(h, one)[0], what=f"max-pooled MLP, row {i}")
        a1, w1, q1 = first_token_attention(h, one, query="think_end")
        assert qpos[i] - pad == q1[0]
        np.testing.assert_array_equal(arg[i] - pad, a1[0], err_msg=f"attention argmax, row {i}")
        _assert_close(wts[i], w1[0], what=f"attention weight, row {i}")
    # a mean over real tokens does not depend on how the batch is split
    _assert_close(mean_head_outputs(h, b, batch_size=1), mean_head_outputs(h, b, batch_size=len(b)),
                  what="mean head outputs")


# ---- 8. KV-cached continuation ------------------------------------------------------------------------------


def _check_cached_continuation(h, b):
    full = _logits(h, b)
    real = b.attention_mask.bool()
    max_pad = max(b.pad_lengths)
    width = b.tokens.shape[1]
    # a split inside every row's real tokens, and one where some rows' prefix is all padding
    for P in sorted({max_pad + 2, 2}):
        assert 0 < P < width - 1
        with torch.no_grad():
            _, cache = h.bridge(b.tokens[:, :P], attention_mask=b.attention_mask[:, :P],
                                return_type="logits_and_cache")
            assert cache is not None
            suffix = h.bridge(b.tokens[:, P:], attention_mask=b.attention_mask, past_key_values=cache)
        _assert_close(suffix[real[:, P:]], full[:, P:][real[:, P:]], what=f"cached continuation from {P}")
    # several cached steps in a row (as decoding does): P, one token, then the rest
    P = max_pad + 1
    with torch.no_grad():
        _, cache = h.bridge(b.tokens[:, :P], attention_mask=b.attention_mask[:, :P], return_type="logits_and_cache")
        step, cache = h.bridge(b.tokens[:, P:P + 1], attention_mask=b.attention_mask[:, :P + 1],
                               past_key_values=cache, return_type="logits_and_cache")
        rest = h.bridge(b.tokens[:, P + 1:], attention_mask=b.attention_mask, past_key_values=cache)
    _assert_close(step[:, 0], full[:, P], what="one cached step")
    _assert_close(rest, full[:, P + 1:], what="cached continuation after a cached step")


@pytest.mark.organism
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_kv_cached_continuation_equals_full_forward(kind, organism, tiny_models):
    """transformers 5.24 renamed the KV-cache keyword its decoder layers pass to attention (``past_key_values`` ->
    ``cache``); TransformerLens 4.3's bridged attention reads only the old name, so cached keys and values were
    silently never stored or read (worked around by :func:`mechcliff.model.upstream.route_cache_kwarg`). Running
    the first ``P`` tokens with a cache, then the rest on it, must give the full forward's logits at positions
    ``P:`` on a left-padded ragged batch."""
    h = _handle(kind, organism, tiny_models)
    _check_cached_continuation(h, _batch(h))


@pytest.mark.organism
@pytest.mark.parametrize("kind", ["llama_gqa", "qwen3"])
def test_kv_cache_workaround_does_not_depend_on_the_conformance_check(kind, tiny_hf):
    """The transformers 5.24 cache-keyword workaround above must be applied when the bridge boots, not only
    detected by the load-time conformance check: a model loaded with ``check=False`` still gives correct
    KV-cached continuations and generations."""
    from mechcliff.model.loading import load_model
    from mechcliff.model.organism import build_organism_tokenizer

    tok = build_organism_tokenizer()
    h = load_model(model=tiny_hf(kind, tok), tokenizer=tok, name=f"tiny-{kind}-unchecked", check=False)
    b = _batch(h)
    _check_cached_continuation(h, b)
    g = encode(h, PROMPTS, open_thinking=True)
    cached = _greedy_generate(h, g.tokens, g.attention_mask, 4)
    assert cached.tolist() == _greedy_reference(h, g.tokens, g.attention_mask, 4).tolist()


# ---- mechcliff bugs found while writing these tests (fixed) ---------------------------------------------------------


@pytest.mark.organism
def test_unchecked_load_does_not_claim_exact_decomposition_on_sandwich_norms(tiny_hf):
    """Skipping the conformance check (``check=False`` / ``--no-check``) must not make a model with norms after the
    attention (Gemma 2/3) claim an exact per-head decomposition: that property is structural
    (:func:`mechcliff.model.conformance.has_post_attention_norm`) and needs no forward pass."""
    from mechcliff.attribution import direct_probe_attribution
    from mechcliff.model.loading import load_model
    from mechcliff.model.organism import build_organism_tokenizer

    tok = build_organism_tokenizer()
    h = load_model(model=tiny_hf("gemma3", tok), tokenizer=tok, name="tiny-gemma3-unchecked", check=False)
    dpa = direct_probe_attribution(h, _batch(h), _random_probe(h, h.n_layers - 1))
    assert dpa.max_abs_error > 1e-3  # the components really do not add up here
    assert h.exact_decomposition is False
    assert dpa.exact is False
