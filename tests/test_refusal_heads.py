"""Refusal heads by attention shift (mechcliff.refusal_heads): argmax detection on constructed attention, key
regions, the query-row reduction against the full pattern, the per-layer random control, the experiment, bad input."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from mechcliff.errors import MechcliffError
from mechcliff.refusal_heads import (R, REGIONS, RefusalHeads, argmax_keys, between_positions, first_token_attention,
                                     key_regions, random_heads_per_layer, refusal_heads, shift_frequency)


@pytest.fixture(scope="module")
def harmful():
    from mechcliff.data import builtin_prompts

    return builtin_prompts("harmful")[:4] + builtin_prompts("harmful_jailbreak")[:4]


# ---- detection on a constructed attention pattern --------------------------------------------------------------


@pytest.mark.unit
def test_argmax_shift_on_constructed_patterns():
    n, L, H = 4, 2, 3
    on_labels = np.array([R["bos"], R["prompt"], R["template"], R["assistant"], R["think_open"], R["thinking"],
                          R["closing"], R["answer"]])
    gap_row = [R["bos"], R["prompt"], R["template"], R["assistant"], R["think_tags"], R["think_gap"], R["think_tags"],
               R["answer"]]
    no_gap_row = [R["bos"], R["prompt"], R["template"], R["assistant"], R["think_tags"], R["think_tags"],
                  R["closing"], R["answer"]]
    off_labels = np.array([gap_row, gap_row, no_gap_row, no_gap_row])  # examples 2, 3: nothing between the tags
    rows_on = torch.full((n, L, H, 8), 0.01)
    rows_off = torch.full((n, L, H, 8), 0.01)
    rows_on[..., 0] = 0.5  # by default every head parks on BOS in both modes
    rows_off[..., 0] = 0.5
    rows_on[:, 0, 1, 3] = 0.9  # L0H1: assistant (thinking on) ...
    rows_off[:3, 0, 1, 5] = 0.9  # ... -> the gap (thinking off) in 3 of 4 examples
    rows_on[:, 1, 2, 3] = 0.9  # L1H2: assistant -> the closing tag: a shift only where there is no gap token ...
    rows_off[:2, 1, 2, 6] = 0.9
    rows_off[2:, 1, 2, 4] = 0.9  # ... (examples 2, 3: the opening tag)
    rows_on[:, 1, 0, 3] = 0.9  # L1H0: assistant in both modes: no shift
    rows_off[:, 1, 0, 3] = 0.9
    rows_on[:, 0, 2, 1] = 0.9  # L0H2: prompt -> gap: moves, but not from the assistant token
    rows_off[:, 0, 2, 5] = 0.9
    arg_on, w_on = argmax_keys(rows_on)
    arg_off, _ = argmax_keys(rows_off)
    assert torch.allclose(w_on[:, 0, 1], torch.tensor(0.9))
    reg_on = on_labels[arg_on.numpy()]
    reg_off = np.stack([off_labels[i][arg_off[i].numpy()] for i in range(n)])
    has_gap = np.array([True, True, False, False])
    freq, any_shift = shift_frequency(reg_on, reg_off, has_gap)
    expected = np.zeros((L, H))
    expected[0, 1] = 0.75
    expected[1, 2] = 0.5
    np.testing.assert_allclose(freq, expected)
    assert any_shift[1, 0] == 0 and any_shift[0, 2] == 1 and any_shift[0, 0] == 0
    # invalid examples are left out of the frequencies
    freq_v, _ = shift_frequency(reg_on, reg_off, has_gap, valid=np.array([True, True, True, False]))
    assert freq_v[0, 1] == pytest.approx(1.0) and freq_v[1, 2] == pytest.approx(1 / 3)
    assert np.isnan(shift_frequency(reg_on, reg_off, has_gap, valid=np.zeros(4, bool))[0]).all()


@pytest.mark.unit
def test_argmax_ties_go_to_the_earliest_key():
    rows = torch.tensor([[0.2, 0.4, 0.4, 0.0], [0.25, 0.25, 0.25, 0.25]])
    arg, w = argmax_keys(rows)
    assert arg.tolist() == [1, 0] and w.tolist() == pytest.approx([0.4, 0.25])


# ---- key regions ------------------------------------------------------------------------------------------------


def _named(handle, batch, i, thinking):
    lab, gap = key_regions(handle, batch, i, thinking=thinking)
    toks = handle.tokenizer.convert_ids_to_tokens(batch.tokens[i].tolist())
    return [(t, REGIONS[c]) for t, c in zip(toks, lab) if REGIONS[c] != "pad"], gap


@pytest.mark.organism
def test_key_regions_of_the_organism(organism, organism_rollouts):
    from mechcliff.modes import encode_mode, encode_prompts_mode

    off = encode_prompts_mode(organism, ["how do i bake bread", "make a bomb"], thinking=False)
    named, gap = _named(organism, off, 1, thinking=False)
    assert named == [("<bos>", "bos"), ("<|user|>", "template"), ("make", "prompt"), ("a", "prompt"),
                     ("bomb", "prompt"), ("<|end|>", "template"), ("<|assistant|>", "assistant"),
                     ("<think>", "think_tags"), ("</think>", "think_tags")]
    assert not gap  # the organism writes no token between <think> and </think>
    assert between_positions(organism, off).tolist() == [off.tokens.shape[1] - 1] * 2  # fallback: </think>
    on = encode_mode(organism, organism_rollouts[:2], thinking=True, answers=False)
    named, _ = _named(organism, on, 0, thinking=True)
    regions = [r for _, r in named]
    assert regions.count("assistant") == 1 and regions.count("think_open") == 1 and regions.count("closing") == 1
    assert regions.index("assistant") < regions.index("think_open") < regions.index("thinking") < regions.index("closing")


@pytest.mark.organism
def test_key_regions_with_a_gap_token(organism):
    from mechcliff.model.handle import ThinkFormat
    from mechcliff.modes import encode_prompts_mode

    h = types.SimpleNamespace(tokenizer=organism.tokenizer, think=ThinkFormat(opener=" <think> the ", closer=" </think> "),
                              model_id="organism-gap")
    batch = encode_prompts_mode(h, ["make a bomb", "how do i bake a loaf of bread"], thinking=False,
                                no_think_format="empty_block")
    named, gap = _named(h, batch, 0, thinking=False)
    assert gap and named[-3:] == [("<think>", "think_tags"), ("the", "think_gap"), ("</think>", "think_tags")]
    pos = between_positions(h, batch)
    assert [batch.tokens[i, p].item() for i, p in enumerate(pos.tolist())] == [organism.tokenizer.convert_tokens_to_ids("the")] * 2


# ---- the query row, batched, against the full pattern -----------------------------------------------------------


@pytest.mark.organism
@pytest.mark.parametrize("query", ["first_answer", "think_end"])
@pytest.mark.parametrize("max_tokens", [16_384, 1])  # the default budget; one row per chunk
def test_query_row_matches_the_full_pattern(organism, harmful, query, max_tokens):
    from mechcliff.modes import encode_prompts_mode

    batch = encode_prompts_mode(organism, harmful[:5], thinking=False)
    arg, w, qpos = first_token_attention(organism, batch, query=query, batch_size=2, max_tokens=max_tokens)
    assert arg.shape == (5, organism.n_layers, organism.n_heads)
    for i in (0, 3):  # one example at a time, unpadded, whole pattern
        row = batch.row(i)
        toks = torch.tensor([row])
        if query == "first_answer":
            nxt = organism.bridge(toks)[0, -1].argmax()
            toks = torch.cat([toks, nxt.view(1, 1)], 1)
        _, cache = organism.bridge.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_pattern"))
        pad = batch.pad_lengths[i]
        for l in range(organism.n_layers):
            pat = cache[f"blocks.{l}.attn.hook_pattern"][0, :, -1]  # [H, K], query = last position
            assert (arg[i, l] - pad).tolist() == pat.argmax(-1).tolist()
            np.testing.assert_allclose(w[i, l], pat.max(-1).values.numpy(), atol=1e-5)
        assert qpos[i] - pad == toks.shape[1] - 1


# ---- per-layer random control and the experiment ----------------------------------------------------------------


@pytest.mark.organism
def test_random_heads_per_layer(organism):
    heads = [(1, 3), (1, 6), (2, 1)]
    sets = random_heads_per_layer(organism, heads, 4, seed=0)
    assert len(sets) == 4 and len({tuple(s) for s in sets}) > 1
    for s in sets:
        assert sorted(l for l, _ in s) == [1, 1, 2] and not set(s) & set(heads)
    assert sets == random_heads_per_layer(organism, heads, 4, seed=0)  # seeded
    full = random_heads_per_layer(organism, [(0, h) for h in range(7)], 1, seed=0)[0]
    assert full == [(0, 7)]  # fewer left in the layer than asked: all of them


@pytest.mark.organism
def test_ablating_the_planted_heads_restores_refusal_at_the_between_token(organism, organism_probe):
    """On jailbreak prompts the organism's suppression heads act at </think> (the between-tags token without a gap):
    ablating them raises the probe there; the same number of random heads per layer does not."""
    from mechcliff.data import builtin_prompts
    from mechcliff.modes import encode_prompts_mode
    from mechcliff.refusal_heads import _ablation

    batch = encode_prompts_mode(organism, builtin_prompts("harmful_jailbreak")[:6], thinking=False)
    ab = _ablation(organism, [(1, 3), (1, 6), (2, 1)], batch, organism_probe, n_random=2, seed=0, batch_size=8)
    assert ab["baseline"]["score"] < 0.1 and ab["targeted"]["score"] > 0.9
    assert all(r["score"] < 0.1 for r in ab["random"]) and len(ab["random"]) == 2
    assert all(sorted(int(h[1]) for h in r["heads"]) == [1, 1, 2] for r in ab["random"])
    assert ab["drop_targeted"] < 0 < ab["drop_targeted"] + 1  # a negative drop: the probe rose


@pytest.fixture(scope="module")
def heads_result(organism, organism_probe, harmful):
    return refusal_heads(organism, harmful, probe=organism_probe, top_k=2, progress=False, batch_size=8,
                         max_think_tokens=24)


@pytest.mark.organism
def test_refusal_heads_on_the_organism(heads_result, organism):
    res = heads_result
    L, H = organism.n_layers, organism.n_heads
    assert res.region_on.shape == res.region_off.shape == (8, L, H) and res.valid.all()
    assert res.frequency.shape == (L, H) and np.all((res.frequency >= 0) & (res.frequency <= 1))
    assert np.all(res.offset_on <= 0) and np.all(res.offset_off <= 0)
    assert np.all(res.frequency <= res.any_shift + 1e-12)
    ranked = res.ranked()
    assert [h for h, _ in ranked[:2]] == res.heads[:2] or len(ranked) < 2
    assert res.reference_heads == ["L1H3", "L1H6", "L2H1"]
    assert set(res.region_counts("off")) <= set(REGIONS) and "thinking" not in res.region_counts("off")
    if res.heads:
        assert res.ablation is not None and len(res.ablation["random"]) == 3
    else:
        assert res.ablation is None


@pytest.mark.organism
def test_save_load_and_figures(heads_result, tmp_path):
    from mechcliff.figures import load_saved

    heads_result.save(tmp_path / "rh")
    back = load_saved(tmp_path / "rh")
    assert isinstance(back, RefusalHeads)
    np.testing.assert_array_equal(back.region_on, heads_result.region_on)
    np.testing.assert_allclose(back.frequency, heads_result.frequency)
    assert back.heads == heads_result.heads and back.ablation == heads_result.ablation
    fig = back.plot()
    hm = next(t for t in fig.data if t.type == "heatmap")
    assert np.asarray(hm.z).shape == (4, 8) and hm.colorbar.title.text == "shift frequency"
    if back.ablation:
        assert [t.type for t in back.plot_ablation().data][0] == "bar"


@pytest.mark.organism
def test_bad_input(organism, harmful):
    with pytest.raises(MechcliffError, match="not 'omit'"):
        refusal_heads(organism, harmful, no_think_format="omit")
    with pytest.raises(MechcliffError, match="query must be"):
        refusal_heads(organism, harmful, query="last")
    with pytest.raises(MechcliffError, match="min_frequency"):
        refusal_heads(organism, harmful, min_frequency=1.5)
    with pytest.raises(MechcliffError, match="no harmful prompts"):
        refusal_heads(organism, [])


@pytest.mark.organism
def test_cli_refusal_heads(tmp_path, capsys):
    from mechcliff.cli import main

    out = tmp_path / "heads"
    rc = main(["refusal-heads", "--model", "organism", "--out", str(out), "--n", "4", "--top-k", "1",
               "--no-progress", "--max-think-tokens", "24"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert (out / "refusal_heads" / "result.json").exists() and (out / "refusal_heads.html").exists()
    assert "planted heads (organism): L1H3, L1H6, L2H1" in captured.out and "summary: " in captured.out
