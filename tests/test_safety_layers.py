"""Safety-layer localisation (mechcliff.safety_layers): GAP against a hand computation, window selection, bad
inputs, the layer convention against Hugging Face's hidden states, save / load, the figure, and the command."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mechcliff.errors import MechcliffError
from mechcliff.results import Result
from mechcliff.safety_layers import (
    SafetyLayers,
    best_window,
    last_token_states,
    layer_cosines,
    safety_layers,
    safety_layers_from_states,
)


def _cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def _synthetic(seed=0, n_safe=4, n_unsafe=3, n_layers=5, d=6):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_layers, d))
    safe = base + rng.normal(scale=0.3, size=(n_safe, n_layers, d))
    unsafe = base + rng.normal(scale=0.3, size=(n_unsafe, n_layers, d))
    unsafe[:, 2:4] += 3.0 * rng.normal(size=d)  # layers 2-3: the unsafe texts move away
    return safe, unsafe


# ---- GAP and the window, by hand ------------------------------------------------------------------------------


@pytest.mark.unit
def test_gap_against_a_hand_computation():
    safe, unsafe = _synthetic()
    res = safety_layers_from_states(safe, unsafe, window=2)
    for l in range(safe.shape[1]):
        nn = [_cos(safe[i, l], safe[j, l]) for i, j in itertools.combinations(range(4), 2)]  # no self-pairs
        mm = [_cos(unsafe[i, l], unsafe[j, l]) for i, j in itertools.combinations(range(3), 2)]
        nm = [_cos(safe[i, l], unsafe[j, l]) for i in range(4) for j in range(3)]
        assert res.cos_nn[l] == pytest.approx(np.mean(nn), abs=1e-12)
        assert res.cos_mm[l] == pytest.approx(np.mean(mm), abs=1e-12)
        assert res.cos_nm[l] == pytest.approx(np.mean(nm), abs=1e-12)
        assert res.std_nm[l] == pytest.approx(np.std(nm), abs=1e-12)
        assert res.gap[l] == pytest.approx(np.mean(nn) - np.mean(nm), abs=1e-12)
    means = [np.mean(res.gap[k:k + 2]) for k in range(4)]
    assert res.start == int(np.argmax(means)) == 2 and res.safety_layers == [2, 3]
    assert res.score == pytest.approx(max(means))
    assert res.n_pairs == {"nn": 6, "mm": 3, "nm": 12} and res.sampling == "all pairs"


@pytest.mark.unit
def test_tiny_exact_example():
    """Two layers, orthogonal / parallel vectors: every cosine is 0 or 1."""
    e = np.eye(3)
    safe = np.stack([np.stack([e[0], e[0]]), np.stack([e[0], e[1]])])  # layer 0: identical; layer 1: orthogonal
    unsafe = np.stack([np.stack([e[2], e[0]]), np.stack([e[2], e[0]])])
    res = safety_layers_from_states(safe, unsafe, window=1)
    assert np.allclose(res.cos_nn, [1.0, 0.0]) and np.allclose(res.cos_mm, [1.0, 1.0])
    assert np.allclose(res.cos_nm, [0.0, 0.5]) and np.allclose(res.gap, [1.0, -0.5])
    assert res.safety_layers == [0]


@pytest.mark.unit
def test_random_pairs_never_pair_a_text_with_itself():
    """Within a group of two orthogonal texts every distinct pair has cosine 0; a self-pair would give 1."""
    e = np.eye(4)
    safe = np.stack([e[[0]], e[[1]]])  # [2, 1, 4]
    unsafe = np.stack([e[[2]], e[[3]]])
    c = layer_cosines(safe, unsafe, n_pairs=50, seed=3)
    assert c["cos_nn"][0] == 0.0 and c["cos_mm"][0] == 0.0 and c["pairs_nn"] == 50
    s1, s2 = _synthetic(1, n_safe=8, n_unsafe=8)
    a, b = layer_cosines(s1, s2, n_pairs=20, seed=0), layer_cosines(s1, s2, n_pairs=20, seed=0)
    assert np.array_equal(a["cos_nm"], b["cos_nm"])  # seeded
    allp = layer_cosines(s1, s2)
    assert np.abs(a["cos_nn"] - allp["cos_nn"]).max() < 0.2  # an estimate of the all-pairs mean
    res = safety_layers_from_states(s1, s2, n_pairs=20)
    assert res.sampling.startswith("20 random pairs")


@pytest.mark.unit
def test_best_window():
    s = [0.0, 1.0, 3.0, 2.0, 0.0]
    assert best_window(s, 2) == (2, 2.5)
    assert best_window(s, 1) == (2, 3.0)
    assert best_window(s, 5) == (0, pytest.approx(1.2))
    assert best_window([1.0, 0.0, 1.0, 0.0], 1)[0] == 0  # ties: the first window
    assert best_window([np.nan, 1.0, 2.0, 0.5], 2)[0] == 1  # windows containing NaN never win


@pytest.mark.unit
@pytest.mark.parametrize("window,match", [(6, "larger than the 5 layer"), (0, "at least 1"), (-2, "at least 1"),
                                          (1.5, "whole number"), ("3", "whole number"), (True, "whole number")])
def test_bad_windows(window, match):
    safe, unsafe = _synthetic()
    with pytest.raises(MechcliffError, match=match):
        safety_layers_from_states(safe, unsafe, window=window)


@pytest.mark.unit
def test_bad_groups():
    safe, unsafe = _synthetic()
    with pytest.raises(MechcliffError, match="unsafe group is empty"):
        safety_layers_from_states(safe, unsafe[:0])
    with pytest.raises(MechcliffError, match="safe group is empty"):
        safety_layers_from_states(safe[:0], unsafe)
    with pytest.raises(MechcliffError, match="at least 2 texts"):
        safety_layers_from_states(safe[:1], unsafe)
    with pytest.raises(MechcliffError, match="differ in shape"):
        safety_layers_from_states(safe, unsafe[:, :3])
    with pytest.raises(MechcliffError, match="n_pairs"):
        safety_layers_from_states(safe, unsafe, n_pairs=0)
    with pytest.raises(MechcliffError, match=r"\[example, layer, d_model\]"):
        safety_layers_from_states(safe[0], unsafe)


# ---- the result: save / load, figure -------------------------------------------------------------------------


def make_safety_layers() -> SafetyLayers:
    safe, unsafe = _synthetic()
    return safety_layers_from_states(safe, unsafe, window=2, model_id="synthetic", meta={"thinking": "off"})


@pytest.mark.unit
def test_save_load_round_trip(tmp_path):
    res = make_safety_layers()
    res.save(tmp_path / "sl")
    back = Result.load(tmp_path / "sl")
    assert isinstance(back, SafetyLayers)
    for k in ("cos_nn", "cos_mm", "cos_nm", "std_nn", "std_mm", "std_nm"):
        assert np.array_equal(getattr(back, k), getattr(res, k)), k
    assert back.safety_layers == res.safety_layers and back.meta == {"thinking": "off"}
    assert back.n_pairs == res.n_pairs and back.score == res.score
    assert list(back.to_dataframe()["in_window"]) == [False, False, True, True, False]


@pytest.mark.unit
def test_figure_marks_the_window():
    res = make_safety_layers()
    fig = res.plot()
    lines = [t for t in fig.data if t.type == "scatter" and t.mode == "lines+markers"]
    assert [t.name for t in lines] == ["Safe–Safe", "Unsafe–Unsafe", "Safe–Unsafe"]
    bands = [t for t in fig.data if t.type == "scatter" and t.fill == "toself"]
    assert len(bands) == 3 and all(t.showlegend is False for t in bands)
    bar = next(t for t in fig.data if t.type == "bar")
    assert np.allclose(bar.y, res.gap) and bar.yaxis == "y2"
    assert fig.layout.xaxis.title.text == "layer" and fig.layout.yaxis.title.text == "cosine similarity"
    assert fig.layout.yaxis2.title.text == "GAP"
    window = [s for s in fig.layout.shapes if s.type == "rect"]
    assert len(window) == 1 and (window[0].x0, window[0].x1) == (1.5, 3.5)
    assert "2–3" in fig.layout.title.text and fig.data[-1].name == "safety layers 2–3"


# ---- the model side ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def groups(organism, builtin):
    from mechcliff.chat import encode

    think = "the user asks about this so let me think"
    safe = [p.text for p in builtin if p.group == "harmless"][:4]
    unsafe = [p.text for p in builtin if p.group == "harmful"][:4]
    return encode(organism, safe, thinking=[think] * 4), encode(organism, unsafe, thinking=[think] * 4)


@pytest.mark.organism
def test_hidden_states_are_hugging_face_hidden_states(organism, groups):
    """Layer l = HF hidden_states[l + 1] at the position (the last one after the final norm, as HF returns it)."""
    safe, _ = groups
    states = last_token_states(organism, safe, position="think_end", batch_size=3)
    raw = last_token_states(organism, safe, position="think_end", final_norm=False)
    pos = safe.position("think_end")
    with torch.no_grad():
        hs = organism.hf_model(safe.tokens, attention_mask=safe.attention_mask, output_hidden_states=True).hidden_states
    assert len(hs) == organism.n_layers + 1 and states.shape == (4, organism.n_layers, organism.d_model)
    for l in range(organism.n_layers):
        ref = hs[l + 1][torch.arange(4), pos].double().numpy()
        assert np.allclose(states[:, l], ref, atol=1e-5), l
    assert np.allclose(raw[:, :-1], states[:, :-1])
    assert not np.allclose(raw[:, -1], states[:, -1])  # the final norm changes the last layer


@pytest.mark.organism
def test_safety_layers_on_the_organism(organism, groups):
    safe, unsafe = groups
    res = safety_layers(organism, safe, unsafe)
    assert res.cos_nn.shape == (organism.n_layers,) and res.layers == list(range(organism.n_layers))
    assert len(res.safety_layers) == 3 and res.n_safe == 4 and res.model_id == organism.model_id
    assert np.all(np.abs(res.cos_nm) <= 1 + 1e-9)
    dropped = safety_layers(organism, safe, unsafe, window=2, drop_last=True, position="last")
    assert dropped.layers == [0, 1, 2] and dropped.meta["drop_last"] is True and dropped.position == "last"
    with pytest.raises(MechcliffError, match="larger than the 3 layer"):
        safety_layers(organism, safe, unsafe, window=4, drop_last=True)

    with pytest.raises(MechcliffError, match="safe group is empty"):
        safety_layers(organism, safe[[]], unsafe)


@pytest.mark.organism
def test_cli_safety_layers(tmp_path, capsys):
    from mechcliff.cli import main

    out = tmp_path / "sl"
    rc = main(["safety-layers", "--model", "organism", "--out", str(out), "--n-per-group", "4", "--max-think-tokens",
               "16", "--thinking", "off", "--window", "2", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "safety layers (best 2-layer window by GAP)" in text and "thinking off" in text
    assert f"result: {out / 'safety_layers'}" in text and "safety_layers.html" in text
    res = Result.load(out / "safety_layers")
    assert isinstance(res, SafetyLayers) and res.window == 2 and res.meta["thinking"] == "off"
    assert (out / "safety_layers.html").stat().st_size > 1000
    rc = main(["safety-layers", "--model", "organism", "--out", str(out / "x"), "--window", "9", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("mechcliff: error: window of 9 layers is larger than the 4 layer(s) available")
