"""The refusal probe (fit, errors, persistence, consistency) and the refusal trace / cliff statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mechcliff.errors import MechcliffError
from mechcliff.probe import LinearProbe, collect_residuals, fit_probe
from mechcliff.trace import STAT_KEYS, RefusalTrace, cliff_stats, trace_refusal

nan = float("nan")


@pytest.fixture(scope="module")
def organism_trace(organism, organism_batch, organism_probe, organism_rollouts):
    return trace_refusal(organism, organism_batch, organism_probe, groups=[r.group for r in organism_rollouts],
                         ids=[r.id for r in organism_rollouts])


# ---- probe --------------------------------------------------------------------------------------------------


@pytest.mark.organism
def test_probe_fits_behaviour(organism, organism_probe, organism_labels):
    assert 0 < sum(organism_labels) < len(organism_labels)
    m = organism_probe.metrics
    assert m["val_accuracy"] >= 0.95
    assert m["val_auroc"] >= 0.95
    assert [r["layer"] for r in m["by_layer"]] == list(range(organism.n_layers))
    for r in m["by_layer"]:
        assert set(r) >= {"layer", "val_accuracy", "val_auroc", "train_accuracy"}
    best = max(r["val_accuracy"] for r in m["by_layer"])
    assert m["val_accuracy"] == best
    assert organism_probe.w.shape == (organism.d_model,)
    assert organism_probe.model_hash == organism.model_hash and organism_probe.model_id == "organism"
    assert organism_probe.label_source == "behaviour" and organism_probe.position == "think_end"
    assert m["n_train"] + m["n_val"] == len(organism_labels)


@pytest.mark.organism
def test_probe_single_layer(organism, organism_batch, organism_labels):
    p = fit_probe(organism, organism_batch, organism_labels, layer=-1)
    assert p.layer == organism.n_layers - 1
    assert len(p.metrics["by_layer"]) == 1


@pytest.mark.organism
def test_probe_one_class_is_an_error(organism, organism_batch):
    with pytest.raises(MechcliffError, match="two classes"):
        fit_probe(organism, organism_batch, [1] * len(organism_batch))


@pytest.mark.organism
def test_probe_label_count_mismatch(organism, organism_batch):
    with pytest.raises(MechcliffError, match="labels"):
        fit_probe(organism, organism_batch, [0, 1] * 3)


@pytest.mark.organism
@pytest.mark.parametrize("layer", [4, 99, -5])
def test_probe_layer_out_of_range(organism, organism_batch, organism_labels, layer):
    with pytest.raises(MechcliffError, match="out of range"):
        fit_probe(organism, organism_batch, organism_labels, layer=layer)
    with pytest.raises(MechcliffError, match="out of range"):
        collect_residuals(organism, organism_batch, [layer])


@pytest.mark.organism
def test_probe_save_load_round_trip(organism, organism_probe, tmp_path):
    organism_probe.save(tmp_path / "p")
    q = LinearProbe.load(tmp_path / "p", handle=organism)
    np.testing.assert_array_equal(q.w, organism_probe.w)
    assert q.b == organism_probe.b
    assert q.layer == organism_probe.layer
    assert q.metrics == organism_probe.metrics
    assert q.provenance == organism_probe.provenance
    assert (q.model_id, q.model_hash, q.position, q.label_source) == (
        organism_probe.model_id, organism_probe.model_hash, organism_probe.position, organism_probe.label_source)


@pytest.mark.unit
def test_probe_load_missing(tmp_path):
    with pytest.raises(MechcliffError, match="not a saved probe"):
        LinearProbe.load(tmp_path)


@pytest.mark.organism
def test_probe_on_another_model_is_an_error(organism_probe, tiny_models, tmp_path):
    other = tiny_models("llama_gqa")
    organism_probe.save(tmp_path / "p")
    with pytest.raises(MechcliffError, match="trained on model"):
        LinearProbe.load(tmp_path / "p", handle=other)
    with pytest.raises(MechcliffError, match="trained on model"):
        organism_probe.check_model(other)


@pytest.mark.organism
def test_probe_on_same_shape_other_weights_is_an_error(organism, organism_probe):
    """Same architecture and width, other weights (another organism seed): still refused."""
    from mechcliff.model.loading import load_model

    other = load_model("organism", seed=1, check=False)
    assert other.d_model == organism.d_model and other.model_hash != organism.model_hash
    with pytest.raises(MechcliffError, match="trained on model"):
        organism_probe.check_model(other)


@pytest.mark.organism
def test_probe_logit_and_score(organism_probe):
    x = np.random.randn(5, organism_probe.w.shape[0])
    z = organism_probe.logit(x)
    np.testing.assert_allclose(z, x @ organism_probe.w + organism_probe.b)
    np.testing.assert_allclose(organism_probe.score(x), 1 / (1 + np.exp(-z)))
    import torch

    zt = organism_probe.logit(torch.as_tensor(x, dtype=torch.float32))
    np.testing.assert_allclose(zt.numpy(), z, rtol=1e-4, atol=1e-4)


@pytest.mark.organism
def test_collect_residuals_marks_missing_positions_nan(organism, organism_rollouts):
    from mechcliff.generation import encode_rollouts

    rolls = [organism_rollouts[0], organism_rollouts[50]]
    rolls[0] = type(rolls[0])(**{**rolls[0].to_dict(), "has_think_close": False})
    b = encode_rollouts(organism, rolls)
    x = collect_residuals(organism, b, [0, 3])
    assert x.shape == (2, 2, organism.d_model)
    assert np.isnan(x[0]).all() and np.isfinite(x[1]).all()


@pytest.mark.organism
def test_probe_consistent_with_trace(organism, organism_batch, organism_probe, organism_trace):
    """probe.score on collected residuals equals the trace's scores at the same tokens."""
    for anchor in ("think_end", "answer_start", "prompt_end"):
        x = collect_residuals(organism, organism_batch, [organism_probe.layer], anchor)[:, 0]
        direct = organism_probe.score(x)
        pos = organism_batch.position(anchor)
        from_trace = np.array([organism_trace.example(i)[int(pos[i]) - organism_batch.pad_lengths[i]]
                               for i in range(len(organism_batch))])
        np.testing.assert_allclose(from_trace, direct, atol=1e-5)
    # and the trace's "final" statistic is the score at think_end
    x = collect_residuals(organism, organism_batch, [organism_probe.layer], "think_end")[:, 0]
    np.testing.assert_allclose(organism_trace.stats["final"], organism_probe.score(x), atol=1e-5)


# ---- cliff statistics ---------------------------------------------------------------------------------------


@pytest.mark.unit
def test_cliff_stats_hand_computed():
    #           prompt     | thinking (2..5)     | </think> | answer
    s = np.array([0.1, 0.2, 0.9, 0.8, 0.9, 0.7, 0.2, 0.1])
    st = cliff_stats(s, (2, 6), 6)
    assert st["plateau_mean"] == pytest.approx(0.825)
    assert st["plateau_max"] == pytest.approx(0.9)
    assert st["final"] == pytest.approx(0.2)
    assert st["ms"] == pytest.approx(0.625)
    # falls for t = 3..6: 0.1, -0.1, 0.2, 0.5 -> the cliff is at t = 6 (think_end)
    assert st["t_cliff"] == 6 and st["drop"] == pytest.approx(0.5) and st["t_cliff_rel"] == 0
    st_max = cliff_stats(s, (2, 6), 6, plateau="max")
    assert st_max["ms"] == pytest.approx(0.7)


@pytest.mark.unit
def test_cliff_stats_cliff_inside_thinking():
    s = np.array([0.5, 0.9, 0.95, 0.3, 0.35, 0.3, 0.2])
    st = cliff_stats(s, (1, 5), 5)
    assert st["t_cliff"] == 3 and st["drop"] == pytest.approx(0.65) and st["t_cliff_rel"] == -2


@pytest.mark.unit
def test_cliff_stats_no_thinking():
    s = np.array([0.1, 0.2, 0.6, 0.4])
    st = cliff_stats(s, (3, 3), 3)
    assert math.isnan(st["plateau_mean"]) and math.isnan(st["plateau_max"]) and math.isnan(st["ms"])
    assert st["final"] == pytest.approx(0.4)
    assert st["t_cliff"] == -1 and math.isnan(st["drop"])


@pytest.mark.unit
def test_cliff_stats_unclosed_thinking():
    s = np.array([0.1, 0.9, 0.8, 0.7])
    st = cliff_stats(s, (1, 4), -1)
    assert math.isnan(st["final"]) and math.isnan(st["ms"])
    assert st["plateau_mean"] == pytest.approx(0.8)
    assert st["t_cliff"] == -1 and math.isnan(st["t_cliff_rel"])


# ---- trace on the organism ----------------------------------------------------------------------------------


@pytest.mark.organism
def test_trace_shows_the_cliff(organism_trace):
    gs = organism_trace.group_stats()
    assert set(gs) == {"harmless", "harmful", "harmful_jailbreak"}
    assert gs["harmful_jailbreak"]["n"] == 40
    assert gs["harmful_jailbreak"]["ms"] >= 0.5
    assert gs["harmful"]["ms"] <= 0.2
    assert gs["harmful"]["final"] >= 0.5 and gs["harmful_jailbreak"]["final"] <= 0.5
    assert gs["harmful_jailbreak"]["plateau_mean"] >= 0.5
    ms = np.asarray(organism_trace.stats["ms"])
    jb = np.asarray(organism_trace.groups) == "harmful_jailbreak"
    assert (ms[jb] >= 0.5).all()


@pytest.mark.organism
def test_trace_structure(organism_trace, organism_batch, organism_rollouts):
    tr = organism_trace
    assert len(tr) == len(organism_rollouts)
    for i in range(len(tr)):
        n_real = int(organism_batch.attention_mask[i].sum())
        assert len(tr.example(i)) == n_real
        assert 0 <= tr.thinking_start[i] <= tr.thinking_end[i] <= tr.think_end[i] < tr.answer_start[i] <= n_real
        assert tr.think_end[i] == tr.answer_start[i] - 1
        assert 0 <= tr.stats["t_cliff"][i] <= tr.think_end[i]
    assert tr.ids == [r.id for r in organism_rollouts]
    assert tr.probe_layer >= 0 and tr.model_id == "organism"


@pytest.mark.organism
def test_trace_select(organism_trace):
    jb = organism_trace.select("harmful_jailbreak")
    idx = [i for i, g in enumerate(organism_trace.groups) if g == "harmful_jailbreak"]
    assert len(jb) == 40 and set(jb.groups) == {"harmful_jailbreak"}
    for j, i in enumerate(idx):
        np.testing.assert_array_equal(jb.example(j), organism_trace.example(i))
        assert jb.think_end[j] == organism_trace.think_end[i]
        assert jb.stats["ms"][j] == organism_trace.stats["ms"][i]
    assert jb.group_stats()["harmful_jailbreak"] == organism_trace.group_stats()["harmful_jailbreak"]
    with pytest.raises(MechcliffError, match="no examples"):
        organism_trace.select("nonexistent")


@pytest.mark.organism
def test_trace_checks_model(organism_probe, tiny_models):
    from mechcliff.chat import encode

    other = tiny_models("llama_gqa")
    b = encode(other, ["hello"])
    with pytest.raises(MechcliffError):
        trace_refusal(other, b, organism_probe)


@pytest.mark.organism
def test_trace_bad_plateau(organism, organism_batch, organism_probe):
    with pytest.raises(MechcliffError, match="plateau"):
        trace_refusal(organism, organism_batch, organism_probe, plateau="median")


# ---- aligned curves -----------------------------------------------------------------------------------------


def _hand_trace() -> RefusalTrace:
    ex = [np.array([0.0, 0.1, 0.2, 0.3, 0.4]),                       # think_end 4 (last token)
          np.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.35, 0.3]),  # think_end 6, two answer tokens after
          np.array([0.5, 0.5, 0.5])]                                 # thinking never closed
    stats = {k: [nan, 0.5, nan] for k in STAT_KEYS}
    stats["t_cliff"] = [-1, 3, -1]
    return RefusalTrace(
        scores_flat=np.concatenate(ex).astype(np.float32),
        offsets=np.array([0, 5, 14, 17], dtype=np.int64),
        thinking_start=np.array([1, 1, 1]), thinking_end=np.array([3, 5, 3]),
        think_end=np.array([4, 6, -1]), answer_start=np.array([5, 7, 3]),
        groups=["a", "a", "a"], ids=["x", "y", "z"], stats=stats, probe_layer=2, model_id="hand",
    )


@pytest.mark.unit
def test_aligned_curve_masks_missing_offsets():
    tr = _hand_trace()
    c = tr.aligned_curve("a", before=8, after=3)
    x = list(c["x"])
    at = {int(o): k for k, o in enumerate(x)}
    assert x[0] == -8 and x[-1] == 3
    # offset 0: both closed examples -> mean of 0.4 and 0.4
    assert c["n"][at[0]] == 2 and c["mean"][at[0]] == pytest.approx(0.4)
    # offset -4: both cover it (0.0 and 0.8)
    assert c["n"][at[-4]] == 2 and c["mean"][at[-4]] == pytest.approx(0.4)
    # offset -5 and -6: only the longer example covers them; the mean is its value, not halved by a zero
    assert c["n"][at[-5]] == 1 and c["mean"][at[-5]] == pytest.approx(0.9)
    assert c["n"][at[-6]] == 1 and c["mean"][at[-6]] == pytest.approx(1.0)
    # offset +1, +2: only the longer example has answer tokens
    assert c["n"][at[1]] == 1 and c["mean"][at[1]] == pytest.approx(0.35)
    assert c["n"][at[2]] == 1 and c["mean"][at[2]] == pytest.approx(0.3)
    # nobody covers -7, -8, +3: NaN with n == 0, never zero-filled
    for o in (-8, -7, 3):
        assert c["n"][at[o]] == 0 and np.isnan(c["mean"][at[o]])
    # the band is NaN or within [0, 1], and degenerate where n == 1
    assert c["low"][at[-5]] == pytest.approx(0.9) and c["high"][at[-5]] == pytest.approx(0.9)


@pytest.mark.unit
def test_aligned_curve_group_filter_and_unclosed():
    tr = _hand_trace()
    tr.groups = ["a", "b", "a"]
    c = tr.aligned_curve("a", before=2, after=0)
    assert list(c["n"]) == [1, 1, 1]  # only example 0; example 2 never closed
    np.testing.assert_allclose(c["mean"], [0.2, 0.3, 0.4])
    assert set(tr.curves(before=2, after=0)) == {"a", "b"}


@pytest.mark.unit
def test_group_stats_ignore_nan():
    gs = _hand_trace().group_stats()
    assert gs["a"]["n"] == 3 and gs["a"]["ms"] == pytest.approx(0.5)


@pytest.mark.organism
def test_normalized_curve(organism_trace):
    c = organism_trace.normalized_curve("harmful_jailbreak", n_points=20)
    assert c["mean"].shape == (20,) and (c["n"] == 40).all()
    assert c["mean"][0] > 0.5 > c["mean"][-1]  # high plateau, low at the end: the cliff


# ---- persistence --------------------------------------------------------------------------------------------


@pytest.mark.organism
def test_trace_save_load_round_trip(organism_trace, tmp_path):
    organism_trace.save(tmp_path / "t")
    t2 = RefusalTrace.load(tmp_path / "t")
    for f in ("scores_flat", "offsets", "thinking_start", "thinking_end", "think_end", "answer_start"):
        np.testing.assert_array_equal(getattr(t2, f), getattr(organism_trace, f))
    assert t2.groups == organism_trace.groups and t2.ids == organism_trace.ids
    assert t2.probe_layer == organism_trace.probe_layer and t2.plateau == organism_trace.plateau
    for k in organism_trace.stats:
        np.testing.assert_allclose(np.asarray(t2.stats[k], dtype=float), np.asarray(organism_trace.stats[k], dtype=float))
    assert t2.group_stats() == organism_trace.group_stats()


@pytest.mark.unit
def test_trace_round_trip_keeps_nan_stats(tmp_path):
    tr = _hand_trace()
    tr.save(tmp_path / "t")
    t2 = RefusalTrace.load(tmp_path / "t")
    for k in tr.stats:
        assert all(isinstance(v, (int, float)) for v in t2.stats[k]), (k, t2.stats[k])
    assert np.isnan(np.nanmean(np.array(t2.stats["ms"][:1] + [nan])))
    assert t2.to_dataframe()["ms"].dtype.kind == "f"
