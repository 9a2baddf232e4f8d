"""The one capture function: hook names, positions gathered inside the hook, chunking, rows, devices.

Ground truth: ``run_with_cache`` on the same batch (the bridge's own cache of every activation)."""

from __future__ import annotations

import pytest
import torch

from mechcliff.errors import MechcliffError
from mechcliff.model.capture import GLOBAL_SITES, SITES, act_name, capture, forward, layer_of


@pytest.mark.unit
def test_hook_names_round_trip():
    assert act_name("z", 3) == "blocks.3.attn.hook_z" and act_name("resid_post", 0) == "blocks.0.hook_resid_post"
    assert act_name("ln_final") == "ln_final.hook_out" and act_name("embed") == "hook_embed"
    for site in SITES:
        assert layer_of(act_name(site, 7)) == 7
    with pytest.raises(MechcliffError, match="unknown hook site 'zz'"):
        act_name("zz", 1)
    with pytest.raises(MechcliffError, match="needs a layer"):
        act_name("z")
    with pytest.raises(MechcliffError, match="has no layer"):
        act_name(next(iter(GLOBAL_SITES)), 2)
    with pytest.raises(MechcliffError, match="not inside a block"):
        layer_of("hook_embed")


@pytest.fixture(scope="module")
def cached(organism, organism_batch):
    batch = organism_batch[:10]
    names = [act_name("resid_post", 1), act_name("z", 2), act_name("pattern", 0)]
    _, cache = organism.bridge.run_with_cache(batch.tokens, attention_mask=batch.attention_mask,
                                              names_filter=lambda n: n in names)
    return batch, {n: cache[n] for n in names}


@pytest.mark.organism
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_capture_at_positions_equals_the_bridge_cache(organism, cached, batch_size):
    batch, ref = cached
    pos = batch.position("think_end")
    pos[2] = -1  # a missing position: the row runs but is not gathered
    rows = torch.arange(len(batch))
    got: dict[str, dict[int, torch.Tensor]] = {n: {} for n in ref}
    for chunk in capture(organism, batch, list(ref), at=pos, batch_size=batch_size):
        for n, v in chunk.values.items():
            assert v.device.type == "cpu"
            for j, i in enumerate(chunk.where.index.tolist()):
                got[n][i] = v[j]
    keep = rows[pos >= 0].tolist()
    for n, r in ref.items():
        assert sorted(got[n]) == keep
        for i in keep:
            want = r[i, :, pos[i]] if n.endswith("hook_pattern") else r[i, pos[i]]
            # batch composition changes float rounding only; one chunk of everything is the cache's own batch
            tol = 0.0 if batch_size >= len(batch) else 1e-5
            torch.testing.assert_close(got[n][i], want, atol=tol, rtol=tol)


@pytest.mark.organism
def test_capture_rows_readers_and_whole_activations(organism, cached):
    batch, ref = cached
    name = act_name("resid_post", 1)
    w = torch.randn(organism.d_model)
    chunks = list(capture(organism, batch, {name: lambda x, where: x.float() @ w}, rows=[7, 1, 4], batch_size=2,
                          path="bridge"))
    assert [c.where.index.tolist() for c in chunks] == [[7, 1], [4]]
    out = torch.cat([c.values[name] for c in chunks])
    torch.testing.assert_close(out, ref[name][[7, 1, 4]].float() @ w, atol=1e-4, rtol=1e-5)
    # a reader that returns the activation itself gets a copy, never a view of the model's tensor
    (chunk,) = capture(organism, batch, [name], batch_size=len(batch), path="bridge")
    torch.testing.assert_close(chunk.values[name], ref[name], atol=0.0, rtol=0.0)


@pytest.mark.organism
def test_capture_refuses_what_it_cannot_do(organism, cached):
    batch, _ = cached
    with pytest.raises(MechcliffError, match="at least one hook site"):
        next(capture(organism, batch, {}))
    with pytest.raises(MechcliffError, match="batch_size must be at least 1"):
        next(capture(organism, batch, [act_name("z", 0)], batch_size=0))
    with pytest.raises(MechcliffError, match="did not fire"):  # a site past the layer the forward stops at
        next(capture(organism, batch, [act_name("z", organism.n_layers - 1)], stop_at_layer=1))


@pytest.mark.organism
def test_forward_returns_the_bridge_logits(organism, cached):
    batch, _ = cached
    ref = organism.bridge(batch.tokens, attention_mask=batch.attention_mask)
    torch.testing.assert_close(forward(organism, batch.tokens, batch.attention_mask), ref, atol=0.0, rtol=0.0)


@pytest.mark.organism
def test_packed_chunks_cut_their_own_padding_and_keep_the_budget(organism, organism_batch):
    """Rows sorted by length, each chunk without the padding its rows share, at most max_tokens padded tokens; the
    activations are the unpacked ones (to float rounding of another batch composition)."""
    batch = organism_batch
    name = act_name("resid_post", 1)
    pos = batch.position("think_end")
    ref = {}
    for chunk in capture(organism, batch, [name], at=pos, batch_size=8):
        ref.update({int(i): v for i, v in zip(chunk.where.index, chunk.values[name])})
    lengths = batch.attention_mask.sum(1)
    seen, budget = {}, 300
    for chunk in capture(organism, batch, [name], at=pos, batch_size=8, max_tokens=budget, pack=True):
        idx = chunk.where.index
        width = chunk.where.attention_mask.shape[1]
        assert width == int(lengths[chunk.where.index].max()) or chunk.where.offset == 0
        assert chunk.where.offset == batch.tokens.shape[1] - width
        assert len(chunk.where.attention_mask) * width <= budget or len(chunk.where.attention_mask) == 1
        seen.update({int(i): v for i, v in zip(idx, chunk.values[name])})
    assert sorted(seen) == sorted(ref)
    for i in ref:
        torch.testing.assert_close(seen[i], ref[i], atol=1e-5, rtol=1e-5)


@pytest.mark.organism
def test_a_capture_never_computes_the_unembedding(organism, organism_batch):
    calls = []
    handle = organism.hf_model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    try:
        list(capture(organism, organism_batch[:4], [act_name("resid_post", organism.n_layers - 1),
                                                  act_name("ln_final")]))
        assert calls == []
        list(capture(organism, organism_batch[:4], [act_name("z", 0)], return_logits=True))
        assert calls == [1]
    finally:
        handle.remove()


@pytest.mark.unit
def test_chunk_plans_keep_the_order_unless_packing_and_respect_the_budget():
    from mechcliff.model.capture import _plan

    order, lengths = torch.arange(6), torch.tensor([5, 1, 4, 9, 2, 3])
    chunks = _plan(order, lengths, batch_size=4, max_tokens=10, pack=False)
    assert torch.cat(chunks).tolist() == [0, 1, 2, 3, 4, 5]  # the caller's order
    for c in chunks:  # rows x longest row within the budget, or a lone row longer than it
        assert len(c) * int(lengths[c].max()) <= 10 or len(c) == 1
    packed = _plan(order, lengths, batch_size=4, max_tokens=10, pack=True)
    assert torch.cat(packed).tolist() == [1, 4, 5, 2, 0, 3]  # by length, stable
    assert [len(c) for c in _plan(order, lengths, batch_size=4, max_tokens=None, pack=False)] == [4, 2]
