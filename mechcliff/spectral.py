"""Spectral head metrics B1 / B2 / B3 ("CoT is Not the Chain of Truth", arXiv 2602.04856; its code ``Head.py``).

**Which Jacobian.** The paper's "Jacobian" is the *softmax Jacobian of one attention row*: for a row ``p`` of a
head's attention pattern (a probability vector over keys), ``J(p) = diag(p) − p pᵀ``, the derivative of
``softmax`` at the logits that produced ``p``. It is symmetric positive semi-definite, depends on the attention
pattern only (not on ``W_Q``, ``W_K``, ``W_V``, ``W_O`` or the residual stream), and ``J 1 = 0``. B1–B3 are
spectral summaries of that matrix. It is *not* the Jacobian of the head's output with respect to its input: for that,
:func:`head_jacobian_svd` computes the top singular values of the true Jacobian ``∂ head_output[t] / ∂ resid_pre``
by Jacobian-vector products (see there); the two are different objects and answer different questions.

**Procedure (per text, layer and head), following the authors' code:**

1. the head's attention pattern ``A`` (``T × T``) over the text is bilinearly resampled to ``size × size`` (96;
   ``F.interpolate(..., mode="bilinear", align_corners=False)``, without antialiasing, so short texts are upsampled
   and long ones sampled), clamped at 0, and each row renormalised (``row / (row.sum() + 1e-12)``);
2. ``rows`` (24) evenly spaced query rows are taken, ``t = floor(linspace(0, size − 1, 24))``; each row is clamped at 0
   and renormalised again (``p = row / (row.sum() + 1e-12)``), and ``J(p) = diag(p) − p pᵀ``;
3. per row, ``λ_max(J)`` and its eigenvector ``v``; the row with the largest ``λ_max`` is kept (the first on ties);
4. at the kept row: **B1 = λ_max** ("stability"), **B2 = v** ("geometry", a unit vector of length ``size``; sign fixed
   so that its largest-magnitude entry is positive), scalarised for plots as the centroid
   ``c = Σ_k k |v_k| / Σ_k |v_k|`` (0 when ``v = 0``), and **B3 = erank(J)** ("energy"), the entropy effective rank
   ``exp(−Σ_i w_i log w_i)``, ``w_i = e_i² / Σ_k e_k²`` over the eigenvalues ``e_i`` of ``J`` clipped at 0, each ``w_i``
   clipped to ``[1e-12, 1]`` (as the code; a zero matrix, ``Σ e² ≤ 1e-12``, has B3 = 0). The project site calls B3
   "spectral concentration", but the code computes this effective rank (high = spread spectrum); we follow the code.
5. per head: mean and std (population) over the Safe and over the Unsafe texts, the gap
   ``g = mean_safe − mean_unsafe``, and per layer the adaptive power scaling
   ``r = quantile_0.90(|g|) / max|g|``, ``γ = log 0.5 / log r`` (``γ = 1`` when that is < 1 or undefined),
   ``g′ = sign(g) (|g| / max|g|)^γ max|g|``; **key heads** are those with ``|g′| ≥ 0.70 max|g′|``, and the critical
   heads of a layer are the union over B1–B3.

**λ_max: exact by default.** The authors estimate ``λ_max`` and ``v`` with 20 power-iteration steps from a random
zero-mean start. On real attention rows 20 steps have often not converged (on SmolLM2, 5% of all rows were off by more
than 1e-4, up to 6e-2; at the kept row, the one with the largest ``λ_max``, far fewer: none of 8640 heads in
``scripts/bench/spectral.py``, one in 2160 by 2e-4 on another text), so by default (``lambda_method="exact"``)
mechcliff computes them exactly:
``J`` is diagonal-plus-rank-one, so ``λ_max`` is the root in ``(p₍₂₎, p₍₁₎]`` of the secular equation
``Σ_i p_i² / (p_i − λ) = 1`` (solved for every row at once by a monotone Newton iteration, from a two-pole upper
bound) and ``v_i ∝ p_i / (p_i − λ_max)``; the full spectrum needed for B3 comes from a batched
``torch.linalg.eigvalsh`` of the kept rows only (``solver="eigh"`` instead runs a dense batched ``torch.linalg.eigh``
on every row: same numbers, slower). ``lambda_method="power"`` reproduces the paper's 20-step power iteration,
batched, from seeded random starts. :func:`spectral_reference` is the paper's per-head, per-row loop (power iteration
per row, ``numpy.linalg.eigvalsh`` per row); with the same start vectors the batched ``"power"`` mode equals it, and
with enough iterations the power iteration converges to the ``"exact"`` values (both checked by the tests).

B2 is only defined up to a rotation when the top eigenvalue is repeated (e.g. a uniform attention row, whose
``J = I/n − 11ᵀ/n²`` has eigenvalue ``1/n`` with multiplicity ``n − 1``, or a one-hot row, ``J = 0``); then
mechcliff returns one valid eigenvector and the power iteration returns wherever its random start lands.

**Speed** (``scripts/bench/spectral.py``, SmolLM2, 32 texts × 270 heads, one core): the paper's loop 132 s; batched
power iteration 5.0 s (26×, max difference 1e-15); batched exact 2.5 s (54×). A dense batched ``eigh`` of every row
takes longer than the loop (0.7×): the per-row eigendecomposition, not Python, is what the loop spends its time on, so
the speed comes from needing the full spectrum of one row per head only.

**Which text.** The paper reads the chain-of-thought text alone (up to 1,024 tokens); mechcliff reads the encoded
rollout (chat template, prompt, thinking, closing template) from its first token up to ``position`` (default
``"think_end"``, the last token before the answer), the same span as :mod:`mechcliff.safety_layers`, untruncated.
Texts shorter than ``size`` are *up*-sampled by the bilinear resampling, which smears the first rows (the first
query can only attend to itself; resampled, it becomes a spread over ``~size/T`` keys, identical in every head): on
short texts (the organism's ~25 tokens) that row wins the ``λ_max`` argmax in every head and all gaps coincide.
``size=None`` (``mechcliff spectral --size none``) reads each text's own ``T × T`` pattern instead (rows
``floor(linspace(0, T − 1, 24))``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from mechcliff.errors import MechcliffError
from mechcliff.results import Result

SIZE, ROWS, PI_ITERS, Q_SCALE, KEY_RATIO = 96, 24, 20, 0.90, 0.70
ROW_EPS = 1e-12  # row renormalisation: row / (row.sum() + 1e-12)
ERANK_EPS = 1e-12  # effective rank: w clipped to [eps, 1]; zero spectrum (sum e² <= eps) -> 0
METRICS = ("b1", "b2", "b3")
METRIC_NAMES = {"b1": "B1 stability (top eigenvalue)", "b2": "B2 geometry (eigenvector centroid)",
                "b3": "B3 energy (effective rank)"}


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
    entropy = [int(s) for s in (seed if isinstance(seed, (list, tuple)) else [seed])]
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


# --------------------------------------------------------------------------- batched metrics


def spectral_metrics(
    A: torch.Tensor, *, rows: int = ROWS, lambda_method: str = "exact", solver: str = "secular",
    iters: int = PI_ITERS, start: torch.Tensor | None = None, seed: int = 0, lengths: torch.Tensor | None = None,
    chunk: int = 4096,
) -> dict[str, torch.Tensor]:
    """B1, B2, B3 and the kept row for every (already resampled) attention pattern in ``A`` ``[..., n, n]``, batched
    over all leading axes (all examples, layers, heads and rows at once; no Python loop per head).

    ``lengths`` (shape ``A.shape[:-2]``): patterns of different sizes zero-padded to ``n`` (the pattern of length
    ``T`` in the top-left corner); rows are then chosen per pattern from ``T`` (short ones repeat their last row, which
    cannot change the result), and the zero padding adds nothing to ``J``'s spectrum.

    ``lambda_method``: ``"exact"`` (default; ``solver="secular"``: secular-equation ``λ_max`` for every row, dense
    ``eigvalsh`` for the kept rows only; ``solver="eigh"``: dense batched ``eigh`` of every row) or ``"power"`` (the
    paper's ``iters``-step power iteration from ``start`` ``[..., R, n]``, or from :func:`start_vectors` of ``seed``).
    Returns ``b1`` ``[...]``, ``b2`` ``[..., n]`` (unit eigenvector), ``b3`` ``[...]``, ``row`` ``[...]`` (index into
    the pattern's rows) and ``centroid`` ``[...]``.
    """
    if lambda_method not in ("exact", "power"):
        raise MechcliffError(f"unknown lambda_method {lambda_method!r}; use 'exact' or 'power'")
    if solver not in ("secular", "eigh"):
        raise MechcliffError(f"unknown solver {solver!r}; use 'secular' or 'eigh'")
    if A.ndim < 2 or A.shape[-1] != A.shape[-2] or A.shape[-1] < 2:
        raise MechcliffError(f"attention patterns must be square [..., n, n] with n >= 2, got {tuple(A.shape)}")
    if int(rows) < 1:
        raise MechcliffError(f"rows must be at least 1, got {rows}")
    lead, n = A.shape[:-2], A.shape[-1]
    flat = A.reshape(-1, n, n)
    M = flat.shape[0]
    if lengths is None:
        T = torch.full((M,), n, dtype=torch.long)
    else:
        T = torch.as_tensor(lengths, dtype=torch.long).expand(lead).reshape(M)
        if bool((T < 1).any()) or bool((T > n).any()):
            raise MechcliffError(f"lengths must be between 1 and the pattern size {n}")
    R = len(row_indices(n, rows))
    ridx = torch.empty(M, R, dtype=torch.long)
    for t in torch.unique(T).tolist():
        idx = torch.as_tensor(row_indices(int(t), rows), dtype=torch.long)
        ridx[T == t] = torch.cat([idx, idx[-1:].expand(R - len(idx))])
    if lambda_method == "power":
        if start is None:
            start = start_vectors((M, R), n, seed)
        start = start.reshape(-1, R, n)
        if start.shape[0] != M:
            raise MechcliffError(f"start vectors have shape {tuple(start.shape)}, expected [..., {R}, {n}] for {M} "
                                 "patterns")
    b1 = torch.empty(M, dtype=torch.float64)
    b2 = torch.empty(M, n, dtype=torch.float64)
    b3 = torch.empty(M, dtype=torch.float64)
    row = torch.empty(M, dtype=torch.long)
    for s in range(0, M, max(1, int(chunk) // R)):
        e = min(M, s + max(1, int(chunk) // R))
        ar = torch.arange(e - s)
        P = flat[s:e][ar[:, None], ridx[s:e]].double().clamp(min=0.0)  # [m, R, n]
        P = P / (P.sum(-1, keepdim=True) + ROW_EPS)
        if lambda_method == "power":
            lam, vecs = power_iteration(P, start[s:e], iters)
            k = lam.argmax(-1)  # first maximum, as the authors' strict '>'
            v = vecs[ar, k]
            v = _fix_sign(v / (v.norm(dim=-1, keepdim=True) + 1e-12))
            b3[s:e] = _kept_spectra_erank(P[ar, k], T[s:e])
        elif solver == "eigh":
            evals, evecs = torch.linalg.eigh(softmax_jacobian(P))  # [m, R, n], [m, R, n, n]
            lam = evals[..., -1]
            k = lam.argmax(-1)
            v = _fix_sign(evecs[ar, k, :, -1])
            b3[s:e] = effective_rank(evals[ar, k], n_total=T[s:e])
        else:
            lam = top_eigenvalue(P)
            k = lam.argmax(-1)
            v = top_eigenvector(P[ar, k], lam[ar, k])
            b3[s:e] = _kept_spectra_erank(P[ar, k], T[s:e])
        b1[s:e] = lam[ar, k]
        b2[s:e] = v
        row[s:e] = ridx[s:e][ar, k]
    return {"b1": b1.reshape(lead), "b2": b2.reshape(*lead, n), "b3": b3.reshape(lead), "row": row.reshape(lead),
            "centroid": centroid(b2).reshape(lead)}


def centroid(v: torch.Tensor | np.ndarray) -> Any:
    """B2 scalarised: ``c = Σ_k k |v_k| / Σ_k |v_k|`` over the last axis (0 where ``Σ|v| ≤ 1e-12``)."""
    is_np = isinstance(v, np.ndarray)
    t = torch.as_tensor(v).double().abs()
    s = t.sum(-1)
    k = torch.arange(t.shape[-1], dtype=torch.float64)
    c = torch.where(s > 1e-12, (t * k).sum(-1) / (s + 1e-12), torch.zeros_like(s))
    return c.numpy() if is_np else c


# --------------------------------------------------------------------------- the paper's per-head loop (reference)


def spectral_reference(
    A: np.ndarray | torch.Tensor, *, rows: int = ROWS, iters: int = PI_ITERS, start: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[float, np.ndarray, float, int]:
    """The authors' ``operator_features_from_attn`` for ONE resampled pattern ``A`` ``[n, n]``, row by row in numpy:
    power iteration (``iters`` steps) per row, ``numpy.linalg.eigvalsh`` of ``J`` per row for the effective rank,
    keep the row with the largest power-iteration ``λ``. ``start`` ``[R, n]``: the start vector of each row (default:
    the authors' ``default_rng(seed + t).normal`` per row ``t``, made zero-mean and unit). Returns
    ``(b1, v, b3, row)``."""
    A = np.asarray(A.detach().cpu() if isinstance(A, torch.Tensor) else A, dtype=np.float64)
    n = A.shape[0]
    idx = row_indices(n, rows)
    best_b1, best_v, best_b3, best_t = -1e18, None, 0.0, int(idx[0])
    for j, t in enumerate(idx):
        p = np.clip(A[t].astype(np.float64), 0.0, None)
        p = p / (p.sum() + ROW_EPS)
        if start is None:
            v = np.random.default_rng(seed + int(t)).normal(size=n)
            v = v - v.mean()
            v /= np.linalg.norm(v) + 1e-12
        else:
            v = np.asarray(start[j], dtype=np.float64).copy()
        for _ in range(int(iters)):
            w = p * v - p * float(np.dot(p, v))
            nw = np.linalg.norm(w)
            if nw < 1e-14:
                break
            v = w / (nw + 1e-12)
        lam = float(np.dot(v, p * v - p * float(np.dot(p, v))))
        J = np.diag(p) - np.outer(p, p)
        e = np.clip(np.linalg.eigvalsh(J), 0.0, None)
        w2 = e * e
        s = float(np.sum(w2))
        if s <= ERANK_EPS:
            b3 = 0.0
        else:
            w2 = np.clip(w2 / s, ERANK_EPS, 1.0)
            b3 = float(np.exp(-np.sum(w2 * np.log(w2))))
        if lam > best_b1:
            best_b1, best_v, best_b3, best_t = lam, v / (np.linalg.norm(v) + 1e-12), b3, int(t)
    if best_v is None:
        best_v = np.zeros(n)
    return float(best_b1), best_v, float(best_b3), best_t


# --------------------------------------------------------------------------- gap, scaling, key heads


def adaptive_power_scale(x: np.ndarray, q: float = Q_SCALE, eps: float = 1e-12) -> tuple[np.ndarray, float]:
    """The authors' ``global_adaptive_power_scale_signed``: ``r = quantile_q(|x|) / max|x|``, ``γ = log 0.5 / log r``
    (1 when ``r`` is not in ``(0, 1 − 1e-6)`` or ``γ < 1``), ``x′ = sign(x) (|x| / (max|x| + eps))^γ max|x|``."""
    x = np.asarray(x, dtype=np.float64)
    t = np.abs(x)
    m = float(np.nanmax(t)) if t.size and np.isfinite(t).any() else 0.0
    if not np.isfinite(m) or m < 1e-30:
        return x.copy(), 1.0
    finite = t[np.isfinite(t)]
    r = float(np.quantile(finite, q)) / (m + eps)
    gamma = 1.0
    if np.isfinite(r) and 0.0 < r < 1.0 - 1e-6:
        g = math.log(0.5) / math.log(r)
        gamma = g if (math.isfinite(g) and g >= 1.0) else 1.0
    return np.sign(x) * (t / (m + eps)) ** gamma * m, float(gamma)


def key_heads_rule(gap: np.ndarray, q: float = Q_SCALE, ratio: float = KEY_RATIO) -> list[int]:
    """Indices of the key heads of one layer: ``|g′| ≥ ratio · max|g′|`` after :func:`adaptive_power_scale`."""
    scaled, _ = adaptive_power_scale(gap, q)
    a = np.abs(scaled)
    amax = float(np.nanmax(a)) if a.size and np.isfinite(a).any() else 0.0
    if amax <= 0:
        return []
    return [int(h) for h in np.where(a >= ratio * amax)[0]]


# --------------------------------------------------------------------------- the result


@dataclasses.dataclass(repr=False)  # the short repr of Result (summary_rows)
class SpectralHeadMetrics(Result):
    """Per-text, per-head B1 / B2 / B3 of the attention-softmax Jacobian (see the module docstring), Safe vs Unsafe."""

    KIND: ClassVar[str] = "spectral_head_metrics"
    b1: np.ndarray  # [example, layer, head] λ_max at the kept row
    b2: np.ndarray  # [example, layer, head, size] top eigenvector at the kept row (unit)
    b3: np.ndarray  # [example, layer, head] effective rank at the kept row
    row: np.ndarray  # [example, layer, head] kept row (index into the size x size pattern)
    is_safe: np.ndarray  # [example] 1 = Safe group, 0 = Unsafe
    layers: list[int]  # model layer of each entry of axis 1
    size: int | None = SIZE  # None: patterns not resampled (each text's own T x T)
    rows: int = ROWS
    lambda_method: str = "exact"
    iters: int = PI_ITERS
    q: float = Q_SCALE
    key_ratio: float = KEY_RATIO
    position: str = "think_end"
    model_id: str = ""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    # ---- per-example values and group statistics
    def values(self, metric: str) -> np.ndarray:
        """``[example, layer, head]`` values of ``"b1"``, ``"b2"`` (the eigenvector's centroid) or ``"b3"``."""
        m = _metric_name(metric)
        if m == "b2":
            return centroid(np.asarray(self.b2, dtype=np.float64))
        return np.asarray(getattr(self, m), dtype=np.float64)

    def _groups(self) -> tuple[np.ndarray, np.ndarray]:
        safe = np.asarray(self.is_safe).astype(bool)
        return safe, ~safe

    def group_stats(self, metric: str) -> dict[str, np.ndarray]:
        """``mean_safe``, ``std_safe``, ``mean_unsafe``, ``std_unsafe`` (population std), each ``[layer, head]``."""
        v = self.values(metric)
        safe, unsafe = self._groups()
        out = {}
        for name, sel in (("safe", safe), ("unsafe", unsafe)):
            x = v[sel]
            out[f"mean_{name}"] = x.mean(0) if len(x) else np.full(v.shape[1:], np.nan)
            out[f"std_{name}"] = x.std(0) if len(x) else np.full(v.shape[1:], np.nan)
        return out

    def gap(self, metric: str = "b1") -> np.ndarray:
        """``mean_safe − mean_unsafe`` per head, ``[layer, head]``."""
        st = self.group_stats(metric)
        return st["mean_safe"] - st["mean_unsafe"]

    def scaled_gap(self, metric: str = "b1") -> tuple[np.ndarray, np.ndarray]:
        """The adaptively power-scaled gap ``g′`` ``[layer, head]`` and ``γ`` per layer (scaling is per layer, over
        its heads, as the authors')."""
        g = self.gap(metric)
        out, gammas = np.zeros_like(g), np.ones(g.shape[0])
        for li in range(g.shape[0]):
            out[li], gammas[li] = adaptive_power_scale(g[li], self.q)
        return out, gammas

    def key_heads(self, metric: str | None = None) -> dict[int, list[int]]:
        """Key heads per model layer: ``|g′| ≥ key_ratio · max|g′|`` within the layer, for one metric, or (``None``)
        the union over B1–B3 (the paper's critical heads)."""
        metrics = METRICS if metric is None else (_metric_name(metric),)
        out: dict[int, list[int]] = {}
        for li, layer in enumerate(self.layers):
            heads: set[int] = set()
            for m in metrics:
                heads.update(key_heads_rule(self.gap(m)[li], self.q, self.key_ratio))
            out[int(layer)] = sorted(heads)
        return out

    def key_head_labels(self, metric: str | None = None) -> list[str]:
        return [f"L{l}H{h}" for l, hs in self.key_heads(metric).items() for h in hs]

    def to_dataframe(self):
        import pandas as pd

        rows = []
        keys = {m: self.key_heads(m) for m in METRICS}
        stats = {m: self.group_stats(m) for m in METRICS}
        for li, layer in enumerate(self.layers):
            for h in range(self.b1.shape[2]):
                r: dict[str, Any] = {"head": f"L{layer}H{h}", "layer": layer, "index": h}
                for m in METRICS:
                    st = stats[m]
                    r.update({f"{m}_safe": st["mean_safe"][li, h], f"{m}_unsafe": st["mean_unsafe"][li, h],
                              f"{m}_gap": st["mean_safe"][li, h] - st["mean_unsafe"][li, h],
                              f"{m}_key": h in keys[m][int(layer)]})
                rows.append(r)
        return pd.DataFrame(rows)

    def summary_rows(self) -> list[tuple[str, str]]:
        safe, unsafe = self._groups()
        return [("model", self.model_id or "n/a"), ("texts", f"{int(safe.sum())} safe, {int(unsafe.sum())} unsafe"),
                ("layers", _ranges(self.layers)), ("heads per layer", str(self.b1.shape[2])),
                ("pattern", (f"{self.size}x{self.size}" if self.size else "own length, not resampled")
                 + f", {self.rows} rows"), ("λ_max", self.lambda_method),
                ("key heads (B1–B3 union)", ", ".join(self.key_head_labels()) or "none")]

    def plot(self, metric: str = "gap", of: str = "b1", group: str = "all", scaled: bool = False,
             highlight: list[tuple[int, int]] | None = None, title: str | None = None):
        """Layer × head heatmap. ``metric="gap"`` (default): the Safe − Unsafe gap of ``of`` (``"b1"``, ``"b2"``,
        ``"b3"``; ``scaled=True``: the power-scaled ``g′``), key heads outlined; ``metric="b1"|"b2"|"b3"``: the mean
        over ``group`` (``"all"``, ``"safe"``, ``"unsafe"``), the B1–B3 union of key heads outlined. ``highlight``
        overrides the outlined cells (``(layer, head)`` with model layer numbers)."""
        from mechcliff.plotting import layer_head_heatmap

        if metric == "gap":
            m = _metric_name(of)
            z = self.scaled_gap(m)[0] if scaled else self.gap(m)
            cells = [(l, h) for l, hs in self.key_heads(m).items() for h in hs]
            what = f"{'scaled ' if scaled else ''}gap of {METRIC_NAMES[m]}"
            fig = layer_head_heatmap(z, title=title or f"Safe − Unsafe {what}", colorbar_title=f"{m.upper()} gap "
                                     "(safe − unsafe)" + (" scaled" if scaled else ""), signed=True)
            name = f"key heads (|g′| ≥ {self.key_ratio:g}·max)"
        else:
            m = _metric_name(metric)
            v = self.values(m)
            safe, unsafe = self._groups()
            sel = {"all": np.ones(len(v), dtype=bool), "safe": safe, "unsafe": unsafe}.get(group)
            if sel is None:
                raise MechcliffError(f"unknown group {group!r}; use 'all', 'safe' or 'unsafe'")
            if not sel.any():
                raise MechcliffError(f"no {group} examples in this result")
            z = v[sel].mean(0)
            cells = [(l, h) for l, hs in self.key_heads().items() for h in hs]
            fig = layer_head_heatmap(z, title=title or f"{METRIC_NAMES[m]}, mean over {group} texts",
                                     colorbar_title=m.upper(), signed=False)
            name = "key heads (B1–B3 union)"
        cells = list(highlight) if highlight is not None else cells
        _relabel_layers(fig, self.layers, cells, name)
        return fig


def spectral_figures(result: SpectralHeadMetrics) -> dict[str, Any]:
    """The Safe − Unsafe gap heatmap of each metric, B1, B2 and B3 (``metric -> figure``), key heads outlined."""
    return {m: result.plot(metric="gap", of=m) for m in METRICS}


def write_spectral(result: SpectralHeadMetrics, out: str, name: str = "spectral") -> tuple[Any, Any]:
    """Save ``result`` to ``out/name`` and write ``out/name.html``: a self-contained page (offline, plotly.js inlined
    once) with the summary, the key heads of each metric and the gap heatmaps of B1, B2 and B3."""
    from pathlib import Path

    from mechcliff.report import write_report

    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise MechcliffError(f"--out {out} exists and is not a folder")
    path = result.save(out_dir / name)
    html = out_dir / f"{name}.html"
    rows = list(result.summary_rows())
    rows[-1:-1] = [(f"key heads by {m.upper()}", ", ".join(result.key_head_labels(m)) or "none") for m in METRICS]
    sections = [(METRIC_NAMES[m], fig) for m, fig in spectral_figures(result).items()]
    write_report(html, title=f"Spectral head metrics: {result.model_id or 'model'}", summary_rows=rows,
                 sections=sections, notes=[f"Key heads: |g′| ≥ {result.key_ratio:g}·max|g′| within each layer, g′ the "
                                           f"adaptively power-scaled Safe − Unsafe gap (q = {result.q:g})."])
    return path, html


def _ranges(layers: Sequence[int]) -> str:
    ls = [int(l) for l in layers]
    if ls and ls == list(range(ls[0], ls[-1] + 1)) and len(ls) > 2:
        return f"{ls[0]}–{ls[-1]}"
    return ", ".join(map(str, ls))


def _relabel_layers(fig: Any, layers: Sequence[int], cells: Sequence[tuple[int, int]], name: str) -> None:
    """Show model layer numbers on the heatmap's rows (which are positions 0..len(layers)-1) and outline ``cells``."""
    import plotly.graph_objects as go

    from mechcliff.plotting import _OUTLINE

    pos = {int(l): i for i, l in enumerate(layers)}
    hm = fig.data[0]
    n_heads = len(hm.x)
    hm.customdata = np.array([[f"L{l}H{h}" for h in range(n_heads)] for l in layers], dtype=object)
    hm.hovertemplate = "<b>%{customdata}</b><br>value %{z:.4g}<extra></extra>"
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(layers))), ticktext=[str(l) for l in layers])
    xs: list[float | None] = []
    ys: list[float | None] = []
    labels = []
    for l, h in cells:
        if int(l) not in pos or not 0 <= int(h) < n_heads:
            raise MechcliffError(f"highlight cell (layer={l}, head={h}) is not in this result's layers {list(layers)}")
        y = pos[int(l)]
        xs += [h - 0.5, h + 0.5, h + 0.5, h - 0.5, h - 0.5, None]
        ys += [y - 0.5, y - 0.5, y + 0.5, y + 0.5, y - 0.5, None]
        labels.append(f"L{l}H{h}")
    if cells:
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=_OUTLINE, width=2.5), name=name,
                                 showlegend=True, hoverinfo="skip", meta=labels))


def _metric_name(metric: str) -> str:
    m = str(metric).lower()
    if m not in METRICS:
        raise MechcliffError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)} (or 'gap' in plot())")
    return m


# --------------------------------------------------------------------------- the model side


def _check_layers(handle: Any, layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        return list(range(handle.n_layers))
    try:
        out = [handle.check_layer(int(l)) for l in layers]
    except (TypeError, ValueError):
        raise MechcliffError(f"layers must be layer indices, got {layers!r}") from None
    if not out:
        raise MechcliffError("no layers given")
    if len(set(out)) != len(out):
        raise MechcliffError(f"layers must not repeat, got {list(layers)}")
    return out


def attention_blocks(
    handle: Any, batch: Any, *, layers: Sequence[int] | None = None, position: Any = "think_end",
    size: int | None = SIZE, batch_size: int = 8,
) -> list[torch.Tensor]:
    """Each example's attention patterns over its own text, ``[layer, head, n, n]`` per example: the block of
    ``blocks.{l}.attn.hook_pattern`` from the first real token to ``position`` (inclusive), resampled to
    ``size × size`` by :func:`downsample_pattern` (``size=None``: the raw ``T × T`` block, float32)."""
    from mechcliff.safety_layers import _positions

    layers = _check_layers(handle, layers)
    if len(batch) == 0:
        raise MechcliffError("no texts to read attention from (empty batch)")
    if size is not None and int(size) < 2:
        raise MechcliffError(f"size must be at least 2 (or None for no resampling), got {size}")
    pos_all = _positions(batch, position, "")
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for s in range(0, len(batch), batch_size):
            idx = list(range(s, min(len(batch), s + batch_size)))
            store: dict[int, list[torch.Tensor]] = {}

            def grab(pattern: torch.Tensor, hook: Any) -> None:
                l = int(hook.name.split(".")[1])
                blocks = []
                for j, i in enumerate(idx):
                    a, e = batch.pad_lengths[i], int(pos_all[i]) + 1
                    blk = pattern[j, :, a:e, a:e]
                    blocks.append(downsample_pattern(blk, size) if size is not None else blk.detach().float().clone())
                store[l] = blocks

            handle.bridge.run_with_hooks(
                batch.tokens[idx].to(handle.device), attention_mask=batch.attention_mask[idx].to(handle.device),
                fwd_hooks=[(f"blocks.{l}.attn.hook_pattern", grab) for l in layers],
                stop_at_layer=max(layers) + 1, return_type=None)
            for j in range(len(idx)):
                out.append(torch.stack([store[l][j].cpu() for l in layers]))
    return out


def spectral_head_metrics(
    handle: Any, safe: Any, unsafe: Any, *, layers: Sequence[int] | None = None, size: int | None = SIZE,
    rows: int = ROWS, position: Any = "think_end", lambda_method: str = "exact", solver: str = "secular",
    iters: int = PI_ITERS, seed: int = 0, q: float = Q_SCALE, key_ratio: float = KEY_RATIO, batch_size: int = 8,
    meta: dict[str, Any] | None = None,
) -> SpectralHeadMetrics:
    """B1 / B2 / B3 of every head in ``layers`` (default: all) on each text of the two encoded groups ``safe`` and
    ``unsafe`` (:class:`~mechcliff.chat.EncodedBatch`), batched; see the module docstring for every choice.

    ``size``: the resampled pattern size (96, the paper's), or ``None`` for no resampling: each text's own ``T × T``
    pattern, rows ``floor(linspace(0, T − 1, rows))``, B2 of length ``T`` (zero-padded to the longest text in the
    result). Bilinear *up*-sampling of short texts (``T < size``) smears the first rows (the first query, which can
    only attend to itself, becomes a spread over ``~size/T`` columns): on short texts that row can dominate B1 for
    every head; ``size=None`` avoids it.
    """
    for name, b in (("safe", safe), ("unsafe", unsafe)):
        if b is None or len(b) == 0:
            raise MechcliffError(f"the {name} group is empty: spectral head metrics compare two non-empty groups")
    layers = _check_layers(handle, layers)
    if size is not None and int(size) < 2:
        raise MechcliffError(f"size must be at least 2 (or None for no resampling), got {size}")
    if lambda_method not in ("exact", "power"):
        raise MechcliffError(f"unknown lambda_method {lambda_method!r}; use 'exact' or 'power'")
    parts: list[dict[str, torch.Tensor]] = []
    offset = 0
    for b in (safe, unsafe):
        for s in range(0, len(b), batch_size):
            sub = _subbatch(b, range(s, min(len(b), s + batch_size)))
            blocks = attention_blocks(handle, sub, layers=layers, position=position, size=size, batch_size=batch_size)
            parts.append(_chunk_metrics(blocks, offset + s, layers, rows=rows, lambda_method=lambda_method,
                                        solver=solver, iters=iters, seed=seed))
        offset += len(b)
    return _assemble(parts, [1] * len(safe) + [0] * len(unsafe), layers, size=size, rows=rows,
                     lambda_method=lambda_method, iters=iters, q=q, key_ratio=key_ratio, position=str(position),
                     model_id=getattr(handle, "model_id", ""), meta=dict(meta or {}))


def spectral_head_metrics_from_blocks(
    blocks: Sequence[torch.Tensor], is_safe: Sequence[int], layers: Sequence[int], *, size: int | None = SIZE,
    rows: int = ROWS, lambda_method: str = "exact", solver: str = "secular", iters: int = PI_ITERS, seed: int = 0,
    chunk_examples: int = 8, **kwargs: Any,
) -> SpectralHeadMetrics:
    """:func:`spectral_head_metrics` from already captured raw patterns (``blocks[i]`` ``[layer, head, T_i, T_i]``, as
    :func:`attention_blocks` with ``size=None`` returns them): each text's patterns are resampled at once (all
    layers and heads) and measured in batches of ``chunk_examples`` texts. Same numbers as
    :func:`spectral_head_metrics`; this is what :func:`spectral_head_metrics_reference` loops over head by head."""
    if len(blocks) != len(is_safe) or not len(blocks):
        raise MechcliffError(f"need one is_safe flag per block and at least one block, got {len(blocks)} blocks and "
                             f"{len(is_safe)} flags")
    parts = []
    for s in range(0, len(blocks), chunk_examples):
        chunk = [downsample_pattern(b, size) if size is not None else b.float() for b in blocks[s:s + chunk_examples]]
        parts.append(_chunk_metrics(chunk, s, layers, rows=rows, lambda_method=lambda_method, solver=solver,
                                    iters=iters, seed=seed))
    return _assemble(parts, list(is_safe), layers, size=size, rows=rows, lambda_method=lambda_method, iters=iters,
                     **kwargs)


def _chunk_metrics(blocks: Sequence[torch.Tensor], first: int, layers: Sequence[int], *, rows: int,
                   lambda_method: str, solver: str, iters: int, seed: int) -> dict[str, torch.Tensor]:
    """Metrics of consecutive texts ``first, first + 1, ...`` (patterns ``[L, H, n_i, n_i]`` each), batched."""
    A, lengths = _pad_blocks(blocks)  # [b, L, H, n, n], [b]
    H, n = A.shape[2], A.shape[-1]
    start = None
    if lambda_method == "power":
        start = torch.stack([_starts_for(first + j, layers, H, rows, int(t), seed, n)
                             for j, t in enumerate(lengths.tolist())])
    return spectral_metrics(A, rows=rows, lambda_method=lambda_method, solver=solver, iters=iters, start=start,
                            lengths=lengths[:, None, None].expand(A.shape[:3]))


def _assemble(parts: list[dict[str, torch.Tensor]], is_safe: Sequence[int], layers: Sequence[int], *,
              size: int | None, rows: int, lambda_method: str, iters: int, **kwargs: Any) -> SpectralHeadMetrics:
    n_max = max(p["b2"].shape[-1] for p in parts)
    b2 = torch.cat([torch.nn.functional.pad(p["b2"], (0, n_max - p["b2"].shape[-1])) for p in parts])
    cat = {k: torch.cat([p[k] for p in parts]).numpy() for k in ("b1", "b3", "row")}
    return SpectralHeadMetrics(
        b1=cat["b1"], b2=b2.numpy().astype(np.float32), b3=cat["b3"], row=cat["row"].astype(np.int64),
        is_safe=np.asarray(is_safe, dtype=np.int64), layers=[int(l) for l in layers],
        size=None if size is None else int(size), rows=int(rows), lambda_method=lambda_method, iters=int(iters),
        **kwargs)


def _pad_blocks(blocks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-example patterns ``[L, H, T_i, T_i]``, zero-padded to the largest ``T``; returns them and ``T_i``."""
    lengths = torch.tensor([int(b.shape[-1]) for b in blocks], dtype=torch.long)
    n = int(lengths.max())
    import torch.nn.functional as F

    return torch.stack([F.pad(b, (0, n - b.shape[-1], 0, n - b.shape[-1])) for b in blocks]), lengths


def _starts_for(example: int, layers: Sequence[int], n_heads: int, rows: int, T: int, seed: int,
                n: int | None = None) -> torch.Tensor:
    """Power-iteration start vectors ``[layer, head, R, n]`` of one text of length ``T`` (``R = min(rows, n)``), seeded
    by ``(seed, example, layer)``: ``min(rows, T)`` rows of length ``T``; further rows repeat the last one (so a
    repeated row gets the same result and cannot win the argmax), columns zero-padded to ``n``."""
    import torch.nn.functional as F

    n = T if n is None else int(n)
    R, Ri = len(row_indices(n, rows)), len(row_indices(T, rows))
    st = torch.stack([start_vectors((n_heads, Ri), T, [seed, int(example), int(l)]) for l in layers])
    if Ri < R:
        st = torch.cat([st, st[:, :, -1:].expand(-1, -1, R - Ri, -1)], 2)
    return F.pad(st, (0, n - T))


def _subbatch(batch: Any, idx: Sequence[int]) -> Any:
    """Rows ``idx`` of an EncodedBatch, padding kept (spans stay valid)."""
    from mechcliff.chat import EncodedBatch

    idx = list(idx)
    return EncodedBatch(tokens=batch.tokens[idx], attention_mask=batch.attention_mask[idx],
                        spans=[batch.spans[i] for i in idx], has_think_close=[batch.has_think_close[i] for i in idx],
                        pad_lengths=[batch.pad_lengths[i] for i in idx])


def spectral_head_metrics_reference(
    blocks: Sequence[torch.Tensor], is_safe: Sequence[int], layers: Sequence[int], *, size: int | None = SIZE,
    rows: int = ROWS, iters: int = PI_ITERS, seed: int = 0, starts: str = "batched", **kwargs: Any,
) -> SpectralHeadMetrics:
    """The paper's loop over texts, layers and heads: each raw ``T × T`` pattern (``blocks[i]`` ``[layer, head, T,
    T]`` from :func:`attention_blocks` with ``size=None``) is resampled on its own (the authors' per-head
    ``downsample_attn``; ``size=None``: not resampled) and measured by :func:`spectral_reference`.
    ``starts="batched"`` uses the start vectors of :func:`spectral_head_metrics` with ``lambda_method="power"`` (so the
    two must agree); ``"paper"`` the authors' ``default_rng(seed + i*17 + layer_index*1000 + head*13 + row)``."""
    if starts not in ("batched", "paper"):
        raise MechcliffError(f"starts must be 'batched' or 'paper', got {starts!r}")
    n_ex = len(blocks)
    L, H = blocks[0].shape[0], blocks[0].shape[1]
    n_out = int(size) if size is not None else max(int(b.shape[-1]) for b in blocks)
    b1, b3, row = np.zeros((n_ex, L, H)), np.zeros((n_ex, L, H)), np.zeros((n_ex, L, H), dtype=np.int64)
    b2 = np.zeros((n_ex, L, H, n_out))
    for i, blk in enumerate(blocks):
        T = int(size) if size is not None else int(blk.shape[-1])
        Ri = len(row_indices(T, rows))
        st = _starts_for(i, layers, H, rows, T, seed).numpy() if starts == "batched" else None
        for li in range(L):
            for h in range(H):
                A = (downsample_pattern(blk[li, h], size) if size is not None else blk[li, h]).numpy()
                if st is not None:
                    r = spectral_reference(A, rows=rows, iters=iters, start=st[li, h, :Ri])
                else:
                    r = spectral_reference(A, rows=rows, iters=iters, seed=seed + i * 17 + li * 1000 + h * 13)
                b1[i, li, h], v, b3[i, li, h], row[i, li, h] = r
                b2[i, li, h, :T] = _fix_sign(torch.from_numpy(v)).numpy()
    return SpectralHeadMetrics(b1=b1, b2=b2.astype(np.float32), b3=b3, row=row,
                               is_safe=np.asarray(is_safe, dtype=np.int64), layers=[int(l) for l in layers],
                               size=None if size is None else int(size), rows=int(rows),
                               lambda_method=f"power (reference, {iters} steps)", iters=int(iters), **kwargs)


# --------------------------------------------------------------------------- the full Jacobian of a head's output


@dataclasses.dataclass
class JacobianSpectrum:
    """Top singular values of ``∂ head_output / ∂ input`` of one head at one position (:func:`head_jacobian_svd`)."""

    singular_values: np.ndarray
    layer: int
    head: int
    position: int
    wrt: str
    output: str
    shape: tuple[int, int]  # (outputs, inputs) of the Jacobian
    n_products: int  # Jacobian-vector plus vector-Jacobian products used


def head_jacobian_svd(
    handle: Any, batch: Any, *, layer: int, head: int, position: Any = "last", example: int = 0, k: int = 8,
    oversample: int = 8, n_iter: int = 2, wrt: str = "position", output: str = "result", seed: int = 0,
) -> JacobianSpectrum:
    """Top-``k`` singular values of the **full Jacobian of one head's output** with respect to its input — not the
    paper's softmax Jacobian (see the module docstring).

    The function differentiated: the layer's input ``x = blocks.{layer}.hook_resid_pre`` of one example (the
    residual stream before the layer's input norm) ↦ the head's output at token ``position``: its write into the
    residual stream ``z[position, head] @ W_O[head]`` (``output="result"``, ``d_model`` outputs, rank ≤ ``d_head``) or
    ``z[position, head]`` (``output="z"``, ``d_head`` outputs). ``wrt="position"``: only the input at that same token
    varies (``d_model`` inputs); ``wrt="sequence"``: the input at every token (``T·d_model`` inputs; earlier tokens act
    through keys and values). Everything in between (input RMSNorm, rotary, the softmax, values) is differentiated
    exactly, through the bridge.

    Method: a randomized SVD (Halko, Martinsson & Tropp 2011) built only from products with the Jacobian, never
    materialising it: ``k + oversample`` Jacobian-vector products (``torch.func.jvp``, all directions in one batched
    forward), ``n_iter`` rounds of subspace (power) iteration with vector-Jacobian products (``torch.func.vjp``), then
    ``B = Qᵀ J`` by VJPs and ``svdvals(B)``. When ``k + oversample`` reaches the Jacobian's rank (e.g. ``d_head`` for
    one head) the result is exact up to float error.
    """
    from mechcliff.safety_layers import _positions

    if wrt not in ("position", "sequence"):
        raise MechcliffError(f"wrt must be 'position' or 'sequence', got {wrt!r}")
    if output not in ("result", "z"):
        raise MechcliffError(f"output must be 'result' or 'z', got {output!r}")
    layer = handle.check_layer(int(layer))
    if not 0 <= int(head) < handle.n_heads:
        raise MechcliffError(f"head {head} is out of range: {handle.model_id} has {handle.n_heads} heads per layer")
    if not 0 <= int(example) < len(batch):
        raise MechcliffError(f"example {example} is out of range: the batch has {len(batch)} examples")
    if int(k) < 1:
        raise MechcliffError(f"k must be at least 1, got {k}")
    a = batch.pad_lengths[example]
    t = int(_positions(batch, position, "")[example]) - a
    tokens = batch.tokens[example:example + 1, a:].to(handle.device)
    T = tokens.shape[1]
    store: dict[str, torch.Tensor] = {}

    def keep(x: torch.Tensor, hook: Any) -> None:
        store["x"] = x.detach().clone()

    with torch.no_grad():
        handle.bridge.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", keep)],
                                     stop_at_layer=layer + 1, return_type=None)
    x0 = store["x"]  # [1, T, d_model]
    d = x0.shape[-1]
    W = handle.W_O(layer)[int(head)].to(x0.dtype)  # [d_head, d_model]
    onehot = torch.zeros(1, T, 1, dtype=x0.dtype, device=x0.device)
    onehot[0, t, 0] = 1.0

    def f(xin: torch.Tensor) -> torch.Tensor:
        """``xin``: ``[b, d_model]`` (the input at the position) or ``[b, T·d_model]``; ``-> [b, n_out]``."""
        b = xin.shape[0]
        if wrt == "position":
            X = x0 + onehot * (xin[:, None, :] - x0[:, t:t + 1, :])
        else:
            X = xin.reshape(b, T, d)
        out: dict[str, torch.Tensor] = {}

        def grab(z: torch.Tensor, hook: Any) -> None:
            out["z"] = z[:, t, int(head)]

        handle.bridge.run_with_hooks(X, attention_mask=torch.ones(b, T, dtype=torch.long, device=X.device),
                                     start_at_layer=layer, stop_at_layer=layer + 1,
                                     fwd_hooks=[(f"blocks.{layer}.attn.hook_z", grab)], return_type=None)
        z = out["z"]
        return z @ W if output == "result" else z

    x_in = x0[0, t] if wrt == "position" else x0[0].reshape(-1)
    n_in = x_in.numel()
    n_out = d if output == "result" else W.shape[0]
    ell = int(min(int(k) + int(oversample), n_in, n_out))
    g = torch.Generator().manual_seed(int(seed))
    n_products = 0
    with torch.enable_grad():
        def jmul(V: torch.Tensor) -> torch.Tensor:  # rows of V: input directions -> rows J v
            xs = x_in.unsqueeze(0).expand(V.shape[0], -1).contiguous()
            return torch.func.jvp(f, (xs,), (V.to(x_in.dtype),))[1]

        xs = x_in.unsqueeze(0).expand(ell, -1).contiguous()
        _, vjp_fn = torch.func.vjp(f, xs)

        def jtmul(U: torch.Tensor) -> torch.Tensor:  # rows of U: output directions -> rows Jᵀ u
            return vjp_fn(U.to(x_in.dtype))[0]

        omega = torch.randn(ell, n_in, generator=g, dtype=torch.float64).to(x_in.dtype)
        Y = jmul(omega).double()  # [ell, n_out]
        n_products += ell
        for _ in range(int(n_iter)):
            Q = torch.linalg.qr(Y.T).Q  # [n_out, ell]
            Z = jtmul(Q.T).double()  # [ell, n_in]
            Q2 = torch.linalg.qr(Z.T).Q  # [n_in, ell]
            Y = jmul(Q2.T).double()
            n_products += 2 * ell
        Q = torch.linalg.qr(Y.T).Q
        B = jtmul(Q.T).double()  # rows q_jᵀ J -> B = Qᵀ J  [ell, n_in]
        n_products += ell
    s = torch.linalg.svdvals(B)[: int(k)]
    return JacobianSpectrum(singular_values=s.detach().cpu().numpy(), layer=layer, head=int(head),
                            position=int(t + a), wrt=wrt, output=output, shape=(int(n_out), int(n_in)),
                            n_products=n_products)


# --------------------------------------------------------------------------- the command (mechcliff spectral)


def parse_layers(spec: str | None, n_layers: int) -> list[int] | str | None:
    """``--layers``: ``all`` (default), ``safety`` (the best GAP window), or comma-separated indices / ranges."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    if spec.strip().lower() == "safety":
        return "safety"
    out: list[int] = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, part)
                out += list(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise MechcliffError(f"--layers: cannot read {part!r}; use e.g. '3,4,5', '3-5', 'all' or 'safety'"
                                 ) from None
    for l in out:
        if not -n_layers <= l < n_layers:
            raise MechcliffError(f"--layers: layer {l} is out of range (the model has {n_layers} layers: "
                                 f"0..{n_layers - 1})")
    return [l % n_layers for l in out]


def parse_size(spec: Any) -> int | None:
    """``--size``: an int >= 2, or ``none`` (no resampling)."""
    if spec is None or str(spec).strip().lower() in ("none", "raw", "0"):
        return None
    try:
        size = int(str(spec).strip())
    except ValueError:
        raise MechcliffError(f"--size must be a whole number (e.g. 96) or 'none', got {spec!r}") from None
    if size < 2:
        raise MechcliffError(f"--size must be at least 2 (or 'none'), got {size}")
    return size


def run_command(args: Any) -> int:
    """``mechcliff spectral``: rollouts for safe vs unsafe prompts, B1–B3 for every head of the chosen layers, key
    heads, saved result + HTML page (the gap heatmaps of B1, B2 and B3)."""
    from mechcliff.model.loading import load_model
    from mechcliff.safety_layers import load_groups, prepare_groups, safety_layers, write_result

    size = parse_size(args.size)
    safe_p, unsafe_p = load_groups(args.safe, args.unsafe, args.n_per_group)
    handle = load_model(args.model)
    layers = parse_layers(args.layers, handle.n_layers)
    thinking = args.thinking == "on"
    safe, unsafe, _ = prepare_groups(handle, safe_p, unsafe_p, thinking=thinking,
                                     max_think_tokens=args.max_think_tokens, seed=args.seed,
                                     progress=not args.no_progress)
    meta = {"thinking": args.thinking, "max_think_tokens": args.max_think_tokens}
    if size is not None:
        from mechcliff.safety_layers import _positions

        lengths = [int(_positions(b, args.position, "")[i]) - b.pad_lengths[i] + 1 for b in (safe, unsafe)
                   for i in range(len(b))]
        short = sum(t < size for t in lengths)
        if short:
            print(f"note: {short} of {len(lengths)} texts are shorter than {size} tokens "
                  f"({min(lengths)}-{max(lengths)}) and are upsampled, which smears their first attention rows; --size none reads each text's own "
                  "pattern")
    if layers == "safety":
        sl = safety_layers(handle, safe, unsafe, window=args.window, position=args.position, seed=args.seed, meta=meta)
        path, html = write_result(sl, args.out, "safety_layers")
        layers = sl.safety_layers
        print(f"safety layers (best {sl.window}-layer window by GAP): {layers[0]}-{layers[-1]}; saved to {path}")
    res = spectral_head_metrics(handle, safe, unsafe, layers=layers, position=args.position, size=size,
                                lambda_method=args.lambda_method, seed=args.seed, meta=meta)
    path, html = write_spectral(res, args.out, "spectral")  # B1, B2 and B3, one heatmap each
    print(f"{handle.model_id}, thinking {args.thinking}: {int(res.is_safe.sum())} safe vs "
          f"{int((1 - res.is_safe).sum())} unsafe texts, layers {_ranges(res.layers)}")
    for m in METRICS:
        print(f"key heads by {m.upper()}: {', '.join(res.key_head_labels(m)) or 'none'}")
    print(f"key heads (B1-B3 union): {', '.join(res.key_head_labels()) or 'none'}")
    gt = handle.ground_truth
    if gt is not None:  # the organism: show the planted circuit next to what the metric found
        print(f"planted suppression heads (organism): {', '.join(gt.planted_labels)}; harm detectors: "
              f"{', '.join(f'L{l}H{h}' for l, h in gt.harm_detector_heads)}")
    print(f"result: {path}")
    print(f"figure: {html.resolve()}")
    return 0
