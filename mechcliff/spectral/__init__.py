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

**Layout.** :mod:`mechcliff.spectral.kernels`: the numerical kernels (resampling, row choice, the softmax Jacobian,
its exact top eigenpair, the power iteration and its start vectors, the effective rank, the B2 centroid);
:mod:`mechcliff.spectral.metrics`: B1–B3 per head (batched and the paper's reference loop), the gap scaling and the
key-head rule, the result :class:`SpectralHeadMetrics`, and the model side (attention patterns read through
:func:`mechcliff.model.capture.capture`); :mod:`mechcliff.spectral.figures`: the B1–B3 gap heatmaps and the HTML page;
:mod:`mechcliff.spectral.svd`: :func:`head_jacobian_svd`. Every public name is importable from here.
"""

from __future__ import annotations

from mechcliff.spectral.kernels import (
    ERANK_EPS,
    PI_ITERS,
    ROW_EPS,
    ROWS,
    SIZE,
    centroid,
    downsample_pattern,
    effective_rank,
    power_iteration,
    row_indices,
    softmax_jacobian,
    start_vectors,
    top_eigenvalue,
    top_eigenvector,
)
from mechcliff.spectral.metrics import (
    KEY_RATIO,
    METRIC_NAMES,
    METRICS,
    Q_SCALE,
    SpectralHeadMetrics,
    adaptive_power_scale,
    attention_blocks,
    key_heads_rule,
    spectral_head_metrics,
    spectral_head_metrics_from_blocks,
    spectral_head_metrics_reference,
    spectral_metrics,
    spectral_reference,
)
from mechcliff.spectral.metrics import _ranges as _ranges  # used by mechcliff.cli.cot
from mechcliff.spectral.figures import spectral_figures, write_spectral
from mechcliff.spectral.svd import JacobianSpectrum, head_jacobian_svd

__all__ = [
    "ERANK_EPS", "KEY_RATIO", "METRICS", "METRIC_NAMES", "PI_ITERS", "Q_SCALE", "ROWS", "ROW_EPS", "SIZE",
    "JacobianSpectrum", "SpectralHeadMetrics",
    "adaptive_power_scale", "attention_blocks", "centroid", "downsample_pattern", "effective_rank",
    "head_jacobian_svd", "key_heads_rule", "power_iteration", "row_indices", "softmax_jacobian",
    "spectral_figures", "spectral_head_metrics", "spectral_head_metrics_from_blocks",
    "spectral_head_metrics_reference", "spectral_metrics", "spectral_reference", "start_vectors", "top_eigenvalue",
    "top_eigenvector", "write_spectral",
]
