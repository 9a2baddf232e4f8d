"""B1 / B2 / B3 per head, the key-head rule and the result (see :mod:`mechcliff.spectral` for the procedure).

* the batched metrics of resampled patterns (:func:`spectral_metrics`) and the paper's per-row loop they are checked
  against (:func:`spectral_reference`);
* the Safe − Unsafe gap, its adaptive power scaling and the key heads (:func:`adaptive_power_scale`,
  :func:`key_heads_rule`), and the result class :class:`SpectralHeadMetrics` (with its heatmaps);
* the model side: each text's attention patterns, read through :func:`mechcliff.model.capture.capture`
  (:func:`attention_blocks`), and the metrics of every head of two groups of texts
  (:func:`spectral_head_metrics`, :func:`spectral_head_metrics_from_blocks`, :func:`spectral_head_metrics_reference`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from mechcliff.errors import MechcliffError
from mechcliff.model.capture import MAX_TOKENS, Reader, Where, act_name, capture
from mechcliff.results import Result
from mechcliff.spectral.kernels import (
    PI_ITERS,
    ROW_EPS,
    ROWS,
    SIZE,
    ERANK_EPS,
    _fix_sign,
    _kept_spectra_erank,
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

if TYPE_CHECKING:
    from mechcliff.chat import EncodedBatch
    from mechcliff.model.handle import ModelHandle

Q_SCALE, KEY_RATIO = 0.90, 0.70
METRICS = ("b1", "b2", "b3")
METRIC_NAMES = {"b1": "B1 stability (top eigenvalue)", "b2": "B2 geometry (eigenvector centroid)",
                "b3": "B3 energy (effective rank)"}


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
    pstart: torch.Tensor | None = None  # the power iteration's start vectors [M, R, n]
    if lambda_method == "power":
        pstart = (start_vectors((M, R), n, seed) if start is None else start).reshape(-1, R, n)
        if pstart.shape[0] != M:
            raise MechcliffError(f"start vectors have shape {tuple(pstart.shape)}, expected [..., {R}, {n}] for {M} "
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
        if pstart is not None:  # lambda_method == "power"
            lam, vecs = power_iteration(P, pstart[s:e], iters)
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
    n = int(A.shape[0])
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


def _check_layers(handle: ModelHandle, layers: Sequence[int] | None) -> list[int]:
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
    handle: ModelHandle, batch: EncodedBatch, *, layers: Sequence[int] | None = None, position: Any = "think_end",
    size: int | None = SIZE, batch_size: int = 8,
) -> list[torch.Tensor]:
    """Each example's attention patterns over its own text, ``[layer, head, n, n]`` per example: the block of
    ``blocks.{l}.attn.hook_pattern`` from the first real token to ``position`` (inclusive), resampled to
    ``size × size`` by :func:`downsample_pattern` (``size=None``: the raw ``T × T`` block, float32)."""

    layers = _check_layers(handle, layers)
    if len(batch) == 0:
        raise MechcliffError("no texts to read attention from (empty batch)")
    if size is not None and int(size) < 2:
        raise MechcliffError(f"size must be at least 2 (or None for no resampling), got {size}")
    pos_all = batch.require(position, "the requested position")
    names = [act_name("pattern", l) for l in layers]
    read = _block_reader(batch, pos_all, size)
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for chunk in capture(handle, batch, {n: read for n in names}, batch_size=batch_size,
                             max_tokens=MAX_TOKENS):
            for j, i in enumerate(chunk.where.index.tolist()):
                n_i = int(size) if size is not None else int(pos_all[i]) + 1 - batch.pad_lengths[i]
                out.append(torch.stack([chunk.values[n][j, :, :n_i, :n_i] for n in names]))
    return out


def _block_reader(batch: EncodedBatch, pos_all: torch.Tensor, size: int | None) -> Reader:
    """The capture reader of ``attn.hook_pattern`` (``[rows, head, pos, pos]``): each row's block from its first real
    token to its position (inclusive), resampled by :func:`downsample_pattern` (``size=None``: raw, float32),
    zero-padded to the chunk's largest block, ``[rows, head, n, n]`` (:func:`attention_blocks` cuts the padding
    off again)."""
    import torch.nn.functional as F

    def read(pattern: torch.Tensor, where: Where) -> torch.Tensor:
        blocks = []
        for j, i in enumerate(where.index.tolist()):
            a, e = batch.pad_lengths[i], int(pos_all[i]) + 1
            blk = pattern[j, :, a:e, a:e]
            blocks.append(downsample_pattern(blk, size) if size is not None else blk.detach().float())
        n = max(int(b.shape[-1]) for b in blocks)
        return torch.stack([F.pad(b, (0, n - b.shape[-1], 0, n - b.shape[-1])) for b in blocks])

    return read


def spectral_head_metrics(
    handle: ModelHandle, safe: EncodedBatch, unsafe: EncodedBatch, *, layers: Sequence[int] | None = None, size: int | None = SIZE,
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
            sub = b[s:s + batch_size]
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

