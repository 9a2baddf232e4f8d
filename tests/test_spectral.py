"""Spectral head metrics (mechcliff.spectral): closed forms, the paper's power-iteration reference, batched equals
looped, the key-head rule, the result (save / load / figures), the model side on the organism, and the full-Jacobian
randomized SVD against autograd."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mechcliff.cli import parse_layers, parse_size
from mechcliff.errors import MechcliffError
from mechcliff.results import Result
from mechcliff.spectral import (
    SpectralHeadMetrics,
    adaptive_power_scale,
    attention_blocks,
    centroid,
    downsample_pattern,
    effective_rank,
    head_jacobian_svd,
    key_heads_rule,
    power_iteration,
    row_indices,
    softmax_jacobian,
    spectral_head_metrics,
    spectral_head_metrics_from_blocks,
    spectral_head_metrics_reference,
    spectral_metrics,
    spectral_reference,
    start_vectors,
    top_eigenvalue,
    top_eigenvector,
)


def _dirichlet_rows(n_rows: int, n: int, alpha: float = 0.3, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).dirichlet(np.full(n, alpha), size=n_rows))


def _random_patterns(shape, n, seed=0, alpha=0.3):
    """Causal attention-like patterns ``[*shape, n, n]`` (row t attends to keys 0..t)."""
    rng = np.random.default_rng(seed)
    A = rng.dirichlet(np.full(n, alpha), size=(*shape, n))
    A = A * np.tril(np.ones((n, n)))
    A[..., 0, 0] = 1.0
    A = A / A.sum(-1, keepdims=True)
    return torch.from_numpy(A)


# ---- closed forms ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_one_hot_row_has_zero_spectrum():
    p = torch.zeros(1, 12, dtype=torch.float64)
    p[0, 4] = 1.0
    assert float(top_eigenvalue(p)) == 0.0
    assert torch.count_nonzero(softmax_jacobian(p)) == 0
    A = torch.eye(12)  # every row one-hot
    for method in ("exact", "power"):
        m = spectral_metrics(A, lambda_method=method)
        # J = 0 up to the renormalisation row / (row.sum() + 1e-12): B1 = 0, zero spectrum -> B3 = 0
        assert float(m["b1"]) == pytest.approx(0.0, abs=2e-12) and float(m["b3"]) == 0.0
    b1, _, b3, _ = spectral_reference(A.numpy())
    assert b1 == pytest.approx(0.0, abs=2e-12) and b3 == 0.0


@pytest.mark.unit
@pytest.mark.parametrize("n", [2, 5, 16, 96])
def test_uniform_row_closed_form(n):
    """p = 1/n: J = I/n − 11ᵀ/n², eigenvalues 1/n (n − 1 times) and 0."""
    p = torch.full((n,), 1.0 / n, dtype=torch.float64)
    J = softmax_jacobian(p)
    assert torch.allclose(J, torch.eye(n, dtype=torch.float64) / n - torch.ones(n, n, dtype=torch.float64) / n**2)
    ev = torch.linalg.eigvalsh(J)
    assert torch.allclose(ev[1:], torch.full((n - 1,), 1.0 / n, dtype=torch.float64), atol=1e-15)
    assert abs(float(ev[0])) < 1e-15
    assert float(top_eigenvalue(p[None])) == pytest.approx(1.0 / n, abs=1e-15)
    # erank: n − 1 equal eigenvalues and one zero (clipped to 1e-12) -> exp(log(n − 1) + tiny) = n − 1
    assert float(effective_rank(ev)) == pytest.approx(n - 1, rel=1e-9)
    A = torch.full((n, n), 1.0 / n)  # all rows uniform
    for method in ("exact", "power"):
        m = spectral_metrics(A, lambda_method=method)
        assert float(m["b1"]) == pytest.approx(1.0 / n, abs=1e-7)
        assert float(m["b3"]) == pytest.approx(n - 1, rel=1e-6)
        v = m["b2"].double()
        assert float(v.norm()) == pytest.approx(1.0, abs=1e-9) and abs(float(v.sum())) < 1e-6  # v ⟂ 1
    b1, v, b3, row = spectral_reference(A.numpy())
    assert b1 == pytest.approx(1.0 / n, abs=1e-7) and b3 == pytest.approx(n - 1, rel=1e-6)  # (all rows tie)


@pytest.mark.unit
def test_two_point_row_closed_form():
    """p = (a, 1 − a): J = a(1 − a) [[1, −1], [−1, 1]], eigenvalues 2a(1 − a) and 0; v = (1, −1)/√2."""
    for a in (0.5, 0.3, 0.9, 0.999):
        p = torch.zeros(1, 7, dtype=torch.float64)
        p[0, 2], p[0, 5] = a, 1 - a
        lam = top_eigenvalue(p)
        assert float(lam) == pytest.approx(2 * a * (1 - a), rel=1e-12)
        v = top_eigenvector(p, lam)[0]
        expected = torch.zeros(7, dtype=torch.float64)
        expected[2], expected[5] = 1 / math.sqrt(2), -1 / math.sqrt(2)
        assert torch.allclose(v.abs(), expected.abs(), atol=1e-12)


@pytest.mark.unit
def test_secular_top_eigenpair_matches_eigh():
    P = _dirichlet_rows(3000, 40, alpha=0.2)
    P[:200, 25:] = 0.0  # sparse rows (zeros deflate)
    P[200:260] = torch.linspace(1, 2, 40, dtype=torch.float64)  # smooth rows
    P[260, :] = 0.0
    P[260, :3] = torch.tensor([0.4, 0.4, 0.2])  # exact tie at the top
    P[261, :] = 1.0 / 40
    P = P / P.sum(-1, keepdim=True)
    lam = top_eigenvalue(P)
    ev, vecs = torch.linalg.eigh(softmax_jacobian(P))
    assert torch.allclose(lam, ev[:, -1], atol=1e-14, rtol=0)
    v = top_eigenvector(P, lam)
    J = softmax_jacobian(P)
    residual = (J @ v.unsqueeze(-1)).squeeze(-1) - lam[:, None] * v
    assert float(residual.norm(dim=-1).max()) < 1e-10
    assert torch.allclose(v.norm(dim=-1), torch.ones(len(P), dtype=torch.float64))
    gap = ev[:, -1] - ev[:, -2]
    simple = gap > 1e-6  # where the top eigenvalue is simple, the eigenvector is unique up to sign
    assert torch.allclose((v[simple] * vecs[simple, :, -1]).sum(-1).abs(), torch.ones(int(simple.sum()),
                                                                                     dtype=torch.float64), atol=1e-8)


@pytest.mark.unit
def test_effective_rank_formula_and_truncation():
    e = torch.tensor([0.5, 0.25, 0.25, 0.0, -1e-18], dtype=torch.float64)
    w = np.array([0.25, 0.0625, 0.0625]) / 0.375
    h = -(w * np.log(w)).sum() + 2 * (-1e-12 * math.log(1e-12))
    assert float(effective_rank(e)) == pytest.approx(math.exp(h), rel=1e-14)
    # a partial spectrum plus n_total counts the remaining zeros exactly like the full spectrum
    assert float(effective_rank(e[:3], n_total=5)) == pytest.approx(float(effective_rank(e)), rel=1e-14)
    assert float(effective_rank(torch.zeros(4, dtype=torch.float64))) == 0.0


@pytest.mark.unit
def test_downsample_matches_bilinear_interpolate_and_normalises():
    import torch.nn.functional as F

    A = _random_patterns((3,), 40).float()
    y = downsample_pattern(A, 16)
    ref = F.interpolate(A[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0].clamp(min=0)
    ref = ref / (ref.sum(-1, keepdim=True) + 1e-12)
    assert torch.equal(y, ref)
    assert torch.allclose(y.sum(-1), torch.ones(3, 16), atol=1e-6)
    up = downsample_pattern(A[0, :10, :10], 96)  # upsampling a short text
    assert up.shape == (96, 96) and torch.allclose(up.sum(-1), torch.ones(96), atol=1e-5)
    assert list(row_indices(96, 24)) == list(np.linspace(0, 95, 24, dtype=int)) and len(row_indices(5, 24)) == 5
    with pytest.raises(MechcliffError, match="square"):
        downsample_pattern(torch.zeros(3, 4), 8)


# ---- batched vs the paper's per-head, per-row power iteration ------------------------------------------------


@pytest.mark.unit
def test_exact_metrics_equal_converged_power_iteration_reference():
    A = downsample_pattern(_random_patterns((2, 3), 50, seed=1), 96)  # [2, 3, 96, 96]
    m = spectral_metrics(A)
    for i in range(2):
        for h in range(3):
            b1, v, b3, row = spectral_reference(A[i, h], iters=3000)  # a converged power iteration
            assert float(m["b1"][i, h]) == pytest.approx(b1, abs=1e-4)
            assert float(m["b3"][i, h]) == pytest.approx(b3, abs=1e-4)
            assert int(m["row"][i, h]) == row
            assert float(m["centroid"][i, h]) == pytest.approx(float(centroid(v)), abs=1e-4)


@pytest.mark.unit
def test_batched_power_iteration_equals_the_reference_with_the_same_starts():
    A = downsample_pattern(_random_patterns((4,), 30, seed=2), 96)
    R = len(row_indices(96, 24))
    start = start_vectors((4, R), 96, seed=7)
    m = spectral_metrics(A, lambda_method="power", start=start, iters=20)
    for i in range(4):
        b1, v, b3, row = spectral_reference(A[i], iters=20, start=start[i].numpy())
        assert float(m["b1"][i]) == pytest.approx(b1, abs=1e-12)
        assert float(m["b3"][i]) == pytest.approx(b3, abs=1e-10)
        assert int(m["row"][i]) == row
        assert torch.allclose(m["b2"][i].abs(), torch.from_numpy(np.abs(v)), atol=1e-10)


@pytest.mark.unit
def test_dense_eigh_solver_equals_secular():
    A = downsample_pattern(_random_patterns((3, 2), 70, seed=3), 96)
    a, b = spectral_metrics(A, solver="secular"), spectral_metrics(A, solver="eigh")
    for k in ("b1", "b3", "centroid"):
        assert torch.allclose(a[k], b[k], atol=1e-10), k
    assert torch.equal(a["row"], b["row"])


@pytest.mark.unit
def test_power_iteration_is_the_papers():
    p = _dirichlet_rows(5, 20, seed=4)
    v0 = start_vectors((5,), 20, seed=1)
    lam, v = power_iteration(p, v0, iters=20)
    for i in range(5):
        x = v0[i].numpy().copy()
        pi = p[i].numpy()
        for _ in range(20):
            w = pi * x - pi * float(np.dot(pi, x))
            x = w / (np.linalg.norm(w) + 1e-12)
        assert float(lam[i]) == pytest.approx(float(np.dot(x, pi * x - pi * np.dot(pi, x))), abs=1e-14)


@pytest.mark.unit
def test_padded_patterns_of_different_lengths_equal_one_at_a_time():
    short = _random_patterns((2,), 17, seed=5).float()
    long_ = _random_patterns((2,), 31, seed=6).float()
    A = torch.zeros(2, 2, 31, 31)
    A[0, :, :17, :17], A[1] = short, long_
    lengths = torch.tensor([[17, 17], [31, 31]])
    for method in ("exact", "power"):
        m = spectral_metrics(A, lengths=lengths, lambda_method=method, iters=500)
        one = spectral_metrics(short, lambda_method=method, iters=500)
        assert torch.allclose(m["b1"][0], one["b1"], atol=1e-6) and torch.allclose(m["b3"][0], one["b3"], atol=1e-6)
        assert torch.equal(m["row"][0], one["row"])
    with pytest.raises(MechcliffError, match="lengths"):
        spectral_metrics(A, lengths=torch.tensor([[40, 40], [31, 31]]))


@pytest.mark.unit
def test_bad_spectral_inputs():
    with pytest.raises(MechcliffError, match="lambda_method"):
        spectral_metrics(torch.eye(4), lambda_method="lanczos")
    with pytest.raises(MechcliffError, match="solver"):
        spectral_metrics(torch.eye(4), solver="qr")
    with pytest.raises(MechcliffError, match="square"):
        spectral_metrics(torch.zeros(4, 5))
    with pytest.raises(MechcliffError, match="rows"):
        spectral_metrics(torch.eye(4), rows=0)


# ---- gap, adaptive scaling, key heads -------------------------------------------------------------------------


@pytest.mark.unit
def test_adaptive_power_scale_and_key_head_rule_by_hand():
    g = np.array([1.0, -0.5, 0.2, 0.1, 0.05, 0.0, -0.02, 0.01])
    r = np.quantile(np.abs(g), 0.9) / 1.0
    gamma = math.log(0.5) / math.log(r)
    scaled, got_gamma = adaptive_power_scale(g, 0.9)
    assert got_gamma == pytest.approx(gamma)
    assert np.allclose(scaled, np.sign(g) * (np.abs(g) / (1.0 + 1e-12)) ** gamma * 1.0)
    expected = [h for h in range(8) if abs(scaled[h]) >= 0.7 * np.abs(scaled).max()]
    assert key_heads_rule(g) == expected == [0]
    # equal gaps: r = 1 -> γ = 1 -> every head is a key head; no gap at all -> none
    assert key_heads_rule(np.full(5, 0.3)) == [0, 1, 2, 3, 4]
    assert key_heads_rule(np.zeros(5)) == []
    g2 = np.array([1.0] + [0.3] * 9)  # r = 0.3 < 0.5 -> log 0.5 / log r < 1 -> γ = 1: g′ = g
    s2, gm = adaptive_power_scale(g2)
    assert gm == 1.0 and np.allclose(s2, g2) and key_heads_rule(g2) == [0]
    assert adaptive_power_scale(np.array([1.0, 0.9, 0.95, 0.99]))[1] == pytest.approx(math.log(0.5) / math.log(
        np.quantile([1.0, 0.9, 0.95, 0.99], 0.9) / (1 + 1e-12)))  # r close to 1: a steep γ


def make_spectral_result(n_safe: int = 4, n_unsafe: int = 3, layers=(1, 2), n_heads: int = 8) -> SpectralHeadMetrics:
    rng = np.random.default_rng(0)
    n = n_safe + n_unsafe
    L = len(layers)
    b1 = rng.uniform(0.1, 0.2, (n, L, n_heads))
    b3 = rng.uniform(3.0, 4.0, (n, L, n_heads))
    b1[n_safe:, 0, 3] += 0.3  # unsafe texts: layer 1 head 3 is much less stable
    b3[:n_safe, 1, 1] += 2.0
    b2 = np.zeros((n, L, n_heads, 16), dtype=np.float32)
    b2[..., 4] = 1.0
    b2[n_safe:, 0, 6, 4], b2[n_safe:, 0, 6, 12] = 0.0, 1.0
    return SpectralHeadMetrics(b1=b1, b2=b2, b3=b3, row=np.zeros((n, L, n_heads), dtype=np.int64),
                               is_safe=np.array([1] * n_safe + [0] * n_unsafe), layers=list(layers), size=16, rows=8,
                               model_id="synthetic", meta={"thinking": "on"})


@pytest.mark.unit
def test_result_statistics_and_key_heads():
    r = make_spectral_result()
    st = r.group_stats("b1")
    assert np.allclose(st["mean_safe"], r.b1[:4].mean(0)) and np.allclose(st["std_unsafe"], r.b1[4:].std(0))
    assert np.allclose(r.gap("b1"), r.b1[:4].mean(0) - r.b1[4:].mean(0))
    assert r.key_heads("b1")[1] == [3] and r.key_heads("b3")[2] == [1] and r.key_heads("b2")[1] == [6]
    assert r.values("b2")[0, 0, 0] == pytest.approx(4.0) and r.values("b2")[5, 0, 6] == pytest.approx(12.0)
    union = r.key_heads()
    assert 3 in union[1] and 6 in union[1] and 1 in union[2]
    assert "L1H3" in r.key_head_labels() and "L2H1" in r.key_head_labels()
    df = r.to_dataframe()
    assert len(df) == 2 * 8 and bool(df.set_index("head").loc["L1H3", "b1_key"])
    with pytest.raises(MechcliffError, match="unknown metric"):
        r.gap("b4")


@pytest.mark.unit
def test_result_save_load_round_trip(tmp_path):
    r = make_spectral_result()
    r.save(tmp_path / "s")
    back = Result.load(tmp_path / "s")
    assert isinstance(back, SpectralHeadMetrics)
    for k in ("b1", "b2", "b3", "row", "is_safe"):
        assert np.array_equal(getattr(back, k), getattr(r, k)), k
    assert back.layers == [1, 2] and back.meta == {"thinking": "on"} and back.size == 16
    assert back.key_heads() == r.key_heads()
    raw = SpectralHeadMetrics(**{**r.__dict__, "size": None})
    raw.save(tmp_path / "raw")
    assert SpectralHeadMetrics.load(tmp_path / "raw").size is None


def _titles(fig):
    return fig.layout.xaxis.title.text, fig.layout.yaxis.title.text, fig.data[0].colorbar.title.text


@pytest.mark.unit
def test_figures():
    r = make_spectral_result()
    fig = r.plot()  # default: the gap of B1, key heads outlined
    hm = fig.data[0]
    assert hm.type == "heatmap" and np.asarray(hm.z).shape == (2, 8)
    assert hm.zmid == 0 and hm.zmin == -hm.zmax  # signed, centred
    assert _titles(fig)[:2] == ("head", "layer") and "gap" in _titles(fig)[2].lower()
    assert list(fig.layout.yaxis.ticktext) == ["1", "2"]  # model layer numbers, not positions
    outline = fig.data[1]
    assert outline.type == "scatter" and "key heads" in outline.name
    assert list(outline.meta) == r.key_head_labels("b1") and [c for c in outline.meta if c.startswith("L1")] == ["L1H3"]
    assert np.asarray(hm.customdata)[0, 3] == "L1H3"
    f3 = r.plot(metric="gap", of="b3", scaled=True)
    assert [c for c in f3.data[1].meta if c.startswith("L2")] == ["L2H1"] and "scaled" in f3.layout.title.text
    fb1 = r.plot(metric="b1", group="unsafe")
    assert fb1.data[0].zmid is None and "B1" in fb1.layout.title.text and "unsafe" in fb1.layout.title.text
    fb2 = r.plot(metric="b2", highlight=[(2, 0)])
    assert list(fb2.data[1].meta) == ["L2H0"]
    with pytest.raises(MechcliffError, match="not in this result"):
        r.plot(highlight=[(0, 0)])
    with pytest.raises(MechcliffError, match="unknown group"):
        r.plot(metric="b1", group="both")


# ---- the model side (organism) --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def groups(organism, builtin):
    from mechcliff.chat import encode

    think = "the user asks about this so let me think"
    safe = [p.text for p in builtin if p.group == "harmless"][:3]
    unsafe = [p.text for p in builtin if p.group == "harmful_jailbreak"][:3]
    return encode(organism, safe, thinking=[think] * 3), encode(organism, unsafe, thinking=[think] * 3)


@pytest.mark.organism
def test_attention_blocks_are_the_unpadded_per_example_patterns(organism, groups):
    safe, _ = groups
    blocks = attention_blocks(organism, safe, layers=[1, 3], size=None)
    for i in range(len(safe)):
        a, e = safe.pad_lengths[i], int(safe.position("think_end")[i]) + 1
        store = {}
        organism.bridge.run_with_hooks(safe.tokens[i:i + 1, a:e], fwd_hooks=[
            (f"blocks.{l}.attn.hook_pattern", lambda x, hook: store.__setitem__(hook.name, x[0].clone())) for l in (1, 3)])
        assert blocks[i].shape == (2, organism.n_heads, e - a, e - a)
        assert torch.allclose(blocks[i][0], store["blocks.1.attn.hook_pattern"], atol=1e-6)
        assert torch.allclose(blocks[i][1], store["blocks.3.attn.hook_pattern"], atol=1e-6)
    resampled = attention_blocks(organism, safe, layers=[1], size=32)
    assert resampled[0].shape == (1, organism.n_heads, 32, 32)


@pytest.mark.organism
@pytest.mark.parametrize("size", [96, None])
def test_model_metrics_equal_the_per_head_reference(organism, groups, size):
    safe, unsafe = groups
    layers = [1, 2]
    res = spectral_head_metrics(organism, safe, unsafe, layers=layers, size=size, lambda_method="power", batch_size=2)
    raw = attention_blocks(organism, safe, layers=layers, size=None) + attention_blocks(organism, unsafe, layers=layers,
                                                                                         size=None)
    ref = spectral_head_metrics_reference(raw, [1] * 3 + [0] * 3, layers, size=size)
    for m in ("b1", "b2", "b3"):
        assert np.abs(res.values(m) - ref.values(m)).max() < 1e-4, m
    assert np.array_equal(res.row, ref.row)
    exact = spectral_head_metrics(organism, safe, unsafe, layers=layers, size=size)
    fast = spectral_head_metrics_from_blocks(raw, [1] * 3 + [0] * 3, layers, size=size)
    assert np.abs(exact.b1 - fast.b1).max() < 1e-12 and np.abs(exact.b3 - fast.b3).max() < 1e-12
    assert exact.b1.shape == (6, 2, organism.n_heads) and exact.lambda_method == "exact"
    assert exact.b2.shape[-1] == (96 if size else max(b.shape[-1] for b in raw))
    # the exact top eigenvalue bounds the power iteration's Rayleigh quotient from above
    assert (exact.b1 >= res.b1 - 1e-12).all()
    paper = spectral_head_metrics_reference(raw, [1] * 3 + [0] * 3, layers, size=size, starts="paper")
    assert (exact.b1 >= paper.b1 - 1e-12).all()  # (20 steps from the authors' starts: not always converged)


@pytest.mark.organism
def test_model_side_bad_inputs(organism, groups):
    from mechcliff.chat import EncodedBatch

    safe, unsafe = groups
    empty = EncodedBatch(tokens=safe.tokens[:0], attention_mask=safe.attention_mask[:0], spans=[], has_think_close=[],
                         pad_lengths=[])
    with pytest.raises(MechcliffError, match="unsafe group is empty"):
        spectral_head_metrics(organism, safe, empty)
    with pytest.raises(MechcliffError, match="out of range"):
        spectral_head_metrics(organism, safe, unsafe, layers=[7])
    with pytest.raises(MechcliffError, match="size"):
        spectral_head_metrics(organism, safe, unsafe, size=1)
    assert parse_layers("1-2,3", 4) == [1, 2, 3] and parse_layers("all", 4) is None
    assert parse_layers("safety", 4) == "safety" and parse_layers("-1", 4) == [3]
    with pytest.raises(MechcliffError, match="out of range"):
        parse_layers("9", 4)
    with pytest.raises(MechcliffError, match="cannot read"):
        parse_layers("x", 4)
    assert parse_size("none") is None and parse_size("64") == 64
    with pytest.raises(MechcliffError, match="--size"):
        parse_size("big")


# ---- the full Jacobian of a head's output ---------------------------------------------------------------------


def _autograd_singular_values(h, batch, layer, head, wrt, output, example=0):
    a = batch.pad_lengths[example]
    t = int(batch.position("think_end")[example]) - a
    toks = batch.tokens[example:example + 1, a:]
    store = {}
    h.bridge.run_with_hooks(toks, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre",
                                              lambda x, hook: store.__setitem__("x", x.detach().clone()))],
                            stop_at_layer=layer + 1, return_type=None)
    x0 = store["x"]
    T = x0.shape[1]
    W = h.W_O(layer)[head]

    def f(xin):
        X = torch.cat([x0[:, :t], xin[None, None], x0[:, t + 1:]], 1) if wrt == "position" else xin.reshape(1, T, -1)
        out = {}
        h.bridge.run_with_hooks(X, attention_mask=torch.ones(1, T, dtype=torch.long), start_at_layer=layer,
                                stop_at_layer=layer + 1, return_type=None,
                                fwd_hooks=[(f"blocks.{layer}.attn.hook_z", lambda z, hook: out.__setitem__("z", z[0, t, head]))])
        return out["z"] @ W if output == "result" else out["z"]

    xin = x0[0, t] if wrt == "position" else x0[0].reshape(-1)
    J = torch.autograd.functional.jacobian(f, xin)
    return torch.linalg.svdvals(J.double()).numpy(), tuple(J.shape)


@pytest.mark.organism
@pytest.mark.parametrize("wrt,output", [("position", "result"), ("sequence", "result"), ("sequence", "z")])
def test_randomized_svd_of_the_head_jacobian_matches_autograd(organism, groups, wrt, output):
    safe, _ = groups
    layer, head = 2, 5  # a distractor head with random weights: a full-rank head Jacobian
    ref, shape = _autograd_singular_values(organism, safe, layer, head, wrt, output)
    k = organism.d_head  # rank <= d_head; k + oversample >= rank, so the range finder is exact
    got = head_jacobian_svd(organism, safe, layer=layer, head=head, position="think_end", k=k, oversample=4, wrt=wrt,
                            output=output)
    assert got.shape == shape
    assert np.allclose(got.singular_values, ref[:k], rtol=1e-4, atol=1e-6), (got.singular_values, ref[:k])
    assert got.n_products == min(k + 4, *shape) * (2 + 2 * 2)  # range finder, 2 power rounds, B = QᵀJ
    top3 = head_jacobian_svd(organism, safe, layer=layer, head=head, position="think_end", k=3, wrt=wrt, output=output)
    assert np.allclose(top3.singular_values, ref[:3], rtol=1e-3, atol=1e-6)


@pytest.mark.organism
def test_head_jacobian_bad_inputs(organism, groups):
    safe, _ = groups
    with pytest.raises(MechcliffError, match="wrt"):
        head_jacobian_svd(organism, safe, layer=0, head=0, wrt="all")
    with pytest.raises(MechcliffError, match="output"):
        head_jacobian_svd(organism, safe, layer=0, head=0, output="pattern")
    with pytest.raises(MechcliffError, match="head 99"):
        head_jacobian_svd(organism, safe, layer=0, head=99)
    with pytest.raises(MechcliffError, match="layer 9"):
        head_jacobian_svd(organism, safe, layer=9, head=0)
    with pytest.raises(MechcliffError, match="example 5"):
        head_jacobian_svd(organism, safe, layer=0, head=0, example=5)


# ---- the command ----------------------------------------------------------------------------------------------


@pytest.mark.organism
def test_cli_spectral_on_the_organism(tmp_path, capsys):
    from mechcliff.cli import main

    out = tmp_path / "spec"
    rc = main(["spectral", "--model", "organism", "--out", str(out), "--layers", "1-2", "--n-per-group", "3",
               "--max-think-tokens", "16", "--size", "none", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "key heads (B1-B3 union)" in text and f"result: {out / 'spectral'}" in text and "spectral.html" in text
    res = Result.load(out / "spectral")
    assert isinstance(res, SpectralHeadMetrics) and res.layers == [1, 2] and res.size is None
    assert res.b1.shape == (6, 2, 8) and res.meta["thinking"] == "on"
    assert "<html" in (out / "spectral.html").read_text()[:200].lower()


@pytest.mark.organism
def test_cli_spectral_bad_inputs(tmp_path, capsys):
    from mechcliff.cli import main

    rc = main(["spectral", "--model", "organism", "--out", str(tmp_path / "x"), "--layers", "12", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("mechcliff: error: --layers: layer 12 is out of range") and len(err.splitlines()) == 1
    rc = main(["spectral", "--out", str(tmp_path / "x"), "--safe", str(tmp_path / "a.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "give both --safe FILE and --unsafe FILE" in err
