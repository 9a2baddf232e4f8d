"""Numerical kernels for the spectral head metrics (see :mod:`mechcliff.spectral` for the procedure).

Everything here works on tensors of attention rows, batched over any leading axes, with no model and no result:
resampling a pattern (:func:`downsample_pattern`), choosing its query rows (:func:`row_indices`), the softmax
Jacobian ``J(p) = diag(p) − p pᵀ`` (:func:`softmax_jacobian`), its exact top eigenpair from the secular equation
(:func:`top_eigenvalue`, :func:`top_eigenvector`), the paper's power iteration and its start vectors
(:func:`power_iteration`, :func:`start_vectors`), the entropy effective rank (:func:`effective_rank`) and the B2
centroid (:func:`centroid`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from mechcliff.errors import MechcliffError

SIZE, ROWS, PI_ITERS = 96, 24, 20
ROW_EPS = 1e-12  # row renormalisation: row / (row.sum() + 1e-12)
ERANK_EPS = 1e-12  # effective rank: w clipped to [eps, 1]; zero spectrum (sum e² <= eps) -> 0


# --------------------------------------------------------------------------- attention rows


def downsample_pattern(pattern: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """Bilinear resampling of attention patterns ``[..., T, T]`` to ``[..., size, size]`` (float32), clamped at 0
    and each row renormalised, exactly as the authors' ``downsample_attn``."""
    import torch.nn.functional as F

    if pattern.ndim < 2 or pattern.shape[-1] != pattern.shape[-2] or pattern.shape[-1] == 0:
        raise MechcliffError(f"an attention pattern must be a non-empty square [..., T, T], got {tuple(pattern.shape)}")
    lead, T = pattern.shape[:-2], pattern.shape[-1]
    x = pattern.detach().float().reshape(-1, 1, T, T)
    y = F.interpolate(x, size=(int(size), int(size)), mode="bilinear", align_corners=False)[:, 0]
    y = y.clamp(min=0.0)
    y = y / (y.sum(-1, keepdim=True) + ROW_EPS)
    return y.reshape(*lead, int(size), int(size))


def row_indices(n: int, rows: int = ROWS) -> np.ndarray:
    """The query rows used: ``floor(linspace(0, n − 1, min(rows, n)))`` (the authors' ``linspace(..., dtype=int)``)."""
    return np.linspace(0, n - 1, num=min(int(rows), int(n)), dtype=int)


def softmax_jacobian(p: torch.Tensor) -> torch.Tensor:
    """``J(p) = diag(p) − p pᵀ`` for probability vectors ``p`` ``[..., n]`` -> ``[..., n, n]``."""
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


# --------------------------------------------------------------------------- exact top eigenpair (secular equation)


def top_eigenvalue(p: torch.Tensor, max_iter: int = 60) -> torch.Tensor:
    """Exact ``λ_max(diag(p) − p pᵀ)`` for every probability vector in ``p`` ``[..., n]`` (float64), batched.

    With ``d₁ ≥ d₂`` the two largest entries, ``λ_max ∈ [d₂, d₁]`` and (for ``d₁ > d₂``) it is the root of
    ``Σ_i p_i² / (p_i − λ) = 1``. In ``τ = d₁ − λ`` the function ``F(τ) = d₁² + τ (ψ(d₁ − τ) − 1)``, with ``ψ`` the sum
    over the other entries, is decreasing and concave on ``(0, d₁ − d₂)``, so Newton's method from a point right of
    the root converges monotonically; we start at the root of the two-pole model (``d₁`` and ``d₂`` only), which is
    such a point. Ties ``d₁ = d₂`` give ``λ_max = d₁``.
    """
    p = p.double()
    n = p.shape[-1]
    if n < 2:
        return (p - p * p).squeeze(-1)
    top, arg = p.topk(2, dim=-1)
    d1, d2 = top[..., 0], top[..., 1]
    D = d1 - d2
    tie = D <= 1e-14 * d1.clamp(min=1e-300)
    others = torch.ones_like(p, dtype=torch.bool).scatter_(-1, arg[..., :1], False)
    q = torch.where(others, p, torch.zeros_like(p))
    q2 = q * q
    S = D + d1 * d1 + d2 * d2
    tau = 2 * d1 * d1 * D / (S + torch.sqrt((S * S - 4 * d1 * d1 * D).clamp(min=0.0)))  # two-pole root, >= true root
    tau = torch.where(tie, torch.zeros_like(tau), tau)
    flat_q, flat_q2 = q.reshape(-1, n), q2.reshape(-1, n)
    flat_d1, flat_tau = d1.reshape(-1), tau.reshape(-1).clone()
    act = (~tie).reshape(-1).nonzero().flatten()  # rows still iterating (compacted: only they are computed)
    for _ in range(max_iter):
        if act.numel() == 0:
            break
        qa, q2a, d1a, ta = flat_q[act], flat_q2[act], flat_d1[act], flat_tau[act]
        lam = (d1a - ta).clamp(min=1e-300).unsqueeze(-1)  # > 0, so entries with p_i = 0 give exactly 0 below
        inv = 1.0 / (qa - lam)
        r = q2a * inv  # p_i² / (p_i − λ)
        psi = r.sum(-1)
        dpsi = (r * inv).sum(-1)  # ψ'(λ) = Σ p_i² / (p_i − λ)²
        F = d1a * d1a + ta * (psi - 1.0)
        dF = psi - 1.0 - ta * dpsi  # dF/dτ < 0
        new = ta - F / dF
        ok = torch.isfinite(new) & (new < ta) & (new >= 0)
        flat_tau[act] = torch.where(ok, new, ta)
        done = ~ok | ((ta - new) <= 4e-16 * ta.clamp(min=1e-300))
        act = act[~done]
    tau = flat_tau.reshape(d1.shape)
    return d1 - tau


def top_eigenvector(p: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """A unit top eigenvector of ``diag(p) − p pᵀ`` given its top eigenvalue: ``v_i ∝ p_i / (p_i − λ)`` (0 where
    ``p_i = 0``); on ties of the largest entry, ``(e_a − e_b)/√2`` for the two largest entries ``a``, ``b``. Sign: the
    largest-magnitude entry is positive."""
    p = p.double()
    lam = lam.double().unsqueeze(-1)
    top, arg = p.topk(min(2, p.shape[-1]), dim=-1)
    diff = p - lam
    v = torch.where((p > 0) & (diff != 0), p / diff, torch.zeros_like(p))
    if p.shape[-1] >= 2:
        tie = (top[..., 0] - top[..., 1] <= 1e-14 * top[..., 0].clamp(min=1e-300)) & (top[..., 1] > 0)
        if bool(tie.any()):
            alt = torch.zeros_like(p)
            alt.scatter_(-1, arg[..., :1], 1.0)
            alt.scatter_(-1, arg[..., 1:2], -1.0)
            v = torch.where(tie.unsqueeze(-1), alt, v)
    one_hot = (v.abs().sum(-1, keepdim=True) == 0)  # p = 0 (no attention): any vector; use the first basis vector
    if bool(one_hot.any()):
        e0 = torch.zeros_like(p)
        e0[..., 0] = 1.0
        v = torch.where(one_hot, e0, v)
    return _fix_sign(v / v.norm(dim=-1, keepdim=True))


def _fix_sign(v: torch.Tensor) -> torch.Tensor:
    idx = v.abs().argmax(-1, keepdim=True)
    sign = torch.sign(torch.gather(v, -1, idx))
    return v * torch.where(sign == 0, torch.ones_like(sign), sign)


# --------------------------------------------------------------------------- power iteration (the paper's method)


def start_vectors(shape: Sequence[int], n: int, seed: int | Sequence[int] = 0) -> torch.Tensor:
    """Random zero-mean unit start vectors ``[*shape, n]`` (float64) for the power iteration, from a seed or a
    sequence of ints (mixed by ``numpy.random.SeedSequence``): deterministic for the same inputs."""
    seeds: Sequence[Any] = seed if isinstance(seed, (list, tuple)) else [seed]
    entropy = [int(s) for s in seeds]
    g = torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1))
    v = torch.randn(*shape, n, generator=g, dtype=torch.float64)
    v = v - v.mean(-1, keepdim=True)
    return v / (v.norm(dim=-1, keepdim=True) + 1e-12)


def power_iteration(p: torch.Tensor, v0: torch.Tensor, iters: int = PI_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's power iteration on ``J(p)`` for every row at once: ``iters`` steps ``v ← Jv / (‖Jv‖ + 1e-12)``,
    stopping a row for good once ``‖Jv‖ < 1e-14``; returns the Rayleigh quotient ``vᵀJv`` and ``v``."""
    p, v = p.double(), v0.double().clone()
    active = torch.ones(v.shape[:-1], dtype=torch.bool)
    for _ in range(int(iters)):
        w = p * v - p * (p * v).sum(-1, keepdim=True)
        nw = w.norm(dim=-1)
        active = active & ~(nw < 1e-14)
        if not bool(active.any()):
            break
        v = torch.where(active.unsqueeze(-1), w / (nw + 1e-12).unsqueeze(-1), v)
    w = p * v - p * (p * v).sum(-1, keepdim=True)
    return (v * w).sum(-1), v


# --------------------------------------------------------------------------- effective rank


def effective_rank(eigs: torch.Tensor, n_total: int | torch.Tensor | None = None) -> torch.Tensor:
    """Entropy effective rank ``exp(−Σ w log w)``, ``w_i = e_i² / Σ e²`` (``e`` clipped at 0, ``w`` to ``[1e-12, 1]``),
    over the last axis; 0 where ``Σ e² ≤ 1e-12``. ``n_total`` (per row or one int) is the size of the full matrix
    when only part of its spectrum is given, the rest being exact zeros: each missing zero eigenvalue adds the clipped
    term ``−1e-12·log 1e-12`` as in the full computation (a negative difference removes such terms)."""
    e = eigs.double().clamp(min=0.0)
    w = e * e
    s = w.sum(-1, keepdim=True)
    zero = s.squeeze(-1) <= ERANK_EPS
    w = (w / torch.where(s > 0, s, torch.ones_like(s))).clamp(min=ERANK_EPS, max=1.0)
    h = -(w * w.log()).sum(-1)
    if n_total is not None:
        extra = torch.as_tensor(n_total, dtype=torch.float64) - e.shape[-1]
        h = h + extra * (-ERANK_EPS * math.log(ERANK_EPS))
    return torch.where(zero, torch.zeros_like(h), h.exp())


def _kept_spectra_erank(p: torch.Tensor, n_total: torch.Tensor | None = None, bucket: int = 8) -> torch.Tensor:
    """B3 for rows ``p`` ``[K, n]``: eigenvalues by batched ``eigvalsh``, each row's ``J`` cut to the entries up to
    its last non-zero one (the rest of ``J`` is an exact zero block), rows grouped by that size. ``n_total`` ``[K]``:
    each row's true length (default ``n``)."""
    K, n = p.shape
    n_total = torch.full((K,), n, dtype=torch.long) if n_total is None else torch.as_tensor(n_total).reshape(K)
    out = torch.zeros(K, dtype=torch.float64)
    if K == 0:
        return out
    nz = p > 0
    last = torch.where(nz.any(-1), n - nz.flip(-1).int().argmax(-1), torch.zeros(K, dtype=torch.long))
    size = ((last + bucket - 1) // bucket * bucket).clamp(min=min(2, n), max=n)
    for k in torch.unique(size).tolist():
        sel = (size == k).nonzero().flatten()
        pk = p[sel, :k]
        eigs = torch.linalg.eigvalsh(softmax_jacobian(pk))
        out[sel] = effective_rank(eigs, n_total=n_total[sel])
    return out



def centroid(v: torch.Tensor | np.ndarray) -> Any:
    """B2 scalarised: ``c = Σ_k k |v_k| / Σ_k |v_k|`` over the last axis (0 where ``Σ|v| ≤ 1e-12``)."""
    is_np = isinstance(v, np.ndarray)
    t = torch.as_tensor(v).double().abs()
    s = t.sum(-1)
    k = torch.arange(t.shape[-1], dtype=torch.float64)
    c = torch.where(s > 1e-12, (t * k).sum(-1) / (s + 1e-12), torch.zeros_like(s))
    return c.numpy() if is_np else c

