"""Refusal trace and cliff statistics (arXiv 2510.06036).

The trace is the probe's score ``r_t = sigmoid(w · resid_post[layer]_t + b)`` at every real token of prompt,
thinking, closing template and answer. The paper gives no formula for the cliff; these are **our definitions**:

* ``plateau_max`` / ``plateau_mean``: max / mean of ``r_t`` over the thinking tokens (NaN without thinking);
* ``final`` (the paper's ``I'``): ``r_t`` at ``think_end``, the last closing-template token before the answer;
* ``ms`` (misalignment score, ``MS = I - I'``): ``plateau - final`` with ``I`` the plateau chosen by
  ``plateau="mean"`` (default; robust to one-token spikes) or ``"max"``;
* ``t_cliff``: the token where the largest one-step fall happens, ``argmax_t (r_{t-1} - r_t)`` over ``t`` from the
  second thinking token to ``think_end`` inclusive; ``drop`` is that fall. ``t_cliff_rel`` counts from
  ``think_end`` (0 = the last closing token, negative = earlier).

Aggregate curves align examples at ``think_end`` (relative position 0) and average only the examples that have a
token at each offset: missing values are masked, never zero-padded into the mean (unlike the authors' code). The
band is the 95% interval of the mean (normal approximation), clipped to [0, 1]. ``normalized_curve`` resamples
each example's thinking + closing span to ``n_points`` (linear interpolation), as in the paper's figures.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from mechcliff.chat import EncodedBatch
from mechcliff.model.capture import MAX_TOKENS, capture
from mechcliff.results import Result

if TYPE_CHECKING:
    from mechcliff.model.handle import ModelHandle

STAT_KEYS = ("plateau_max", "plateau_mean", "final", "ms", "drop", "t_cliff_rel")


@torch.no_grad()
def probe_scores_all_positions(handle: ModelHandle, batch: EncodedBatch, probe: Any, batch_size: int = 16,
                               max_tokens: int | None = MAX_TOKENS) -> list[np.ndarray]:
    """Per-example probe scores at every real token (ragged list, unpadded coordinates). Rows run in chunks of
    similar length (at most ``batch_size`` rows and ``max_tokens`` padded tokens each)."""
    out: list[np.ndarray | None] = [None] * len(batch)
    w = torch.as_tensor(probe.w, dtype=torch.float32)

    def logit(x: torch.Tensor, where: Any) -> torch.Tensor:
        return x.float() @ w.to(x.device) + probe.b

    for chunk in capture(handle, batch, {probe.hook_name: logit}, batch_size=batch_size, max_tokens=max_tokens,
                         pack=True):
        scores = torch.sigmoid(chunk.values[probe.hook_name]).numpy()
        for j, i in enumerate(chunk.where.index.tolist()):
            out[i] = scores[j, batch.pad_lengths[i] - chunk.where.offset:].astype(np.float32)
    return [o for o in out if o is not None]


def cliff_stats(scores: np.ndarray, thinking: tuple[int, int], think_end: int, plateau: str = "mean") -> dict[str, float]:
    """Per-example statistics (definitions in the module docstring); spans in the same coordinates as ``scores``."""
    t0, t1 = thinking
    nan = float("nan")
    think = scores[t0:t1]
    pmax = float(think.max()) if len(think) else nan
    pmean = float(think.mean()) if len(think) else nan
    final = float(scores[think_end]) if think_end >= 0 else nan
    plateau_v = pmean if plateau == "mean" else pmax
    stats = {"plateau_max": pmax, "plateau_mean": pmean, "final": final, "ms": plateau_v - final,
             "drop": nan, "t_cliff": -1, "t_cliff_rel": nan}
    if think_end >= 0 and len(think):
        lo = t0 + 1
        if think_end >= lo:
            falls = scores[lo - 1:think_end] - scores[lo:think_end + 1]
            k = int(np.argmax(falls))
            stats.update(drop=float(falls[k]), t_cliff=lo + k, t_cliff_rel=float(lo + k - think_end))
    return stats


@dataclasses.dataclass
class RefusalTrace(Result):
    """Ragged per-token probe scores of many examples, with their spans, groups and cliff statistics."""

    KIND: ClassVar[str] = "refusal_trace"
    scores_flat: np.ndarray
    offsets: np.ndarray  # example i is scores_flat[offsets[i]:offsets[i+1]]
    thinking_start: np.ndarray
    thinking_end: np.ndarray
    think_end: np.ndarray  # last closing-template token (-1 when the thinking never closed)
    answer_start: np.ndarray
    groups: list[str]
    ids: list[str | None]
    stats: dict[str, list[float]]
    probe_layer: int = -1
    plateau: str = "mean"
    model_id: str = ""

    def __post_init__(self) -> None:
        # JSON has no NaN: saved undefined statistics come back as None; restore them as NaN.
        self.stats = {k: [float("nan") if v is None else v for v in vals] for k, vals in self.stats.items()}

    def __len__(self) -> int:
        return len(self.groups)

    def example(self, i: int) -> np.ndarray:
        return self.scores_flat[self.offsets[i]:self.offsets[i + 1]]

    def group_names(self) -> list[str]:
        return list(dict.fromkeys(self.groups))

    def select(self, group: str) -> "RefusalTrace":
        """The examples of one group, as a new trace (same order)."""
        from mechcliff.errors import MechcliffError

        idx = [i for i, g in enumerate(self.groups) if g == group]
        if not idx:
            raise MechcliffError(f"no examples of group {group!r}; groups: {', '.join(self.group_names())}")
        parts = [self.example(i) for i in idx]
        return dataclasses.replace(
            self, scores_flat=np.concatenate(parts), offsets=np.concatenate([[0], np.cumsum([len(p) for p in parts])]),
            thinking_start=self.thinking_start[idx], thinking_end=self.thinking_end[idx], think_end=self.think_end[idx],
            answer_start=self.answer_start[idx], groups=[self.groups[i] for i in idx], ids=[self.ids[i] for i in idx],
            stats={k: [v[i] for i in idx] for k, v in self.stats.items()},
        )

    def stats_table(self):
        """Per-group means of the cliff statistics as a DataFrame (one row per group)."""
        import pandas as pd

        return pd.DataFrame.from_dict(self.group_stats(), orient="index")

    def group_stats(self) -> dict[str, dict[str, float]]:
        """Mean of each statistic per group (NaNs ignored), with ``n``."""
        out = {}
        g = np.asarray(self.groups)
        for name in self.group_names():
            sel = g == name
            row: dict[str, float] = {"n": int(sel.sum())}
            for k in STAT_KEYS:
                v = np.asarray(self.stats[k], dtype=float)[sel]
                row[k] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
            out[name] = row
        return out

    def aligned_curve(self, group: str | None = None, before: int = 30, after: int = 5) -> dict[str, np.ndarray]:
        """Mean score by offset from ``think_end`` (``-before`` .. ``+after``), masking examples without that offset."""
        xs = np.arange(-before, after + 1)
        mat = np.full((len(self), len(xs)), np.nan)
        for i in range(len(self)):
            if group is not None and self.groups[i] != group or self.think_end[i] < 0:
                continue
            sc = self.example(i)
            pos = xs + int(self.think_end[i])
            ok = (pos >= 0) & (pos < len(sc))
            mat[i, ok] = sc[pos[ok]]
        return _summarise(xs.astype(float), mat)

    def normalized_curve(self, group: str | None = None, n_points: int = 100) -> dict[str, np.ndarray]:
        """Each example's thinking start .. ``think_end`` resampled to ``n_points`` (0..1), then averaged."""
        xs = np.linspace(0.0, 1.0, n_points)
        rows = []
        for i in range(len(self)):
            if group is not None and self.groups[i] != group or self.think_end[i] < 0:
                continue
            seg = self.example(i)[int(self.thinking_start[i]):int(self.think_end[i]) + 1]
            if len(seg) < 2:
                continue
            rows.append(np.interp(xs, np.linspace(0, 1, len(seg)), seg))
        mat = np.vstack(rows) if rows else np.full((0, n_points), np.nan)
        return _summarise(xs, mat)

    def curves(self, before: int = 30, after: int = 5) -> dict[str, dict[str, np.ndarray]]:
        return {g: self.aligned_curve(g, before, after) for g in self.group_names()}

    def plot(self, before: int = 30, after: int = 5):
        from mechcliff.plotting import cliff_curves

        return cliff_curves(self.curves(before, after))

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"group": self.groups, "id": self.ids, **{k: self.stats[k] for k in STAT_KEYS}})

    def summary_rows(self) -> list[tuple[str, str]]:
        rows = [("examples", str(len(self))), ("probe layer", str(self.probe_layer))]
        for g, st in self.group_stats().items():
            rows.append((g, f"n={st['n']} plateau={st['plateau_' + self.plateau]:.2f} final={st['final']:.2f} MS={st['ms']:.2f}"))
        return rows


def _summarise(xs: np.ndarray, mat: np.ndarray) -> dict[str, np.ndarray]:
    n = np.sum(np.isfinite(mat), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, np.nansum(mat, axis=0) / np.maximum(n, 1), np.nan)
        var = np.where(n > 1, np.nansum((mat - mean) ** 2, axis=0) / np.maximum(n - 1, 1), 0.0)
        half = 1.96 * np.sqrt(var / np.maximum(n, 1))
    return {"x": xs, "mean": mean, "low": np.clip(mean - half, 0, 1), "high": np.clip(mean + half, 0, 1), "n": n}


def trace_refusal(
    handle: ModelHandle, batch: EncodedBatch, probe: Any, *, groups: list[str] | None = None, ids: list[str | None] | None = None,
    plateau: str = "mean", batch_size: int = 16, max_tokens: int | None = MAX_TOKENS,
) -> RefusalTrace:
    """Probe scores at every token of every example, with per-example cliff statistics (module docstring).

    Args:
        handle: the loaded model (:func:`mechcliff.load_model`); must be the probe's model.
        batch: the encoded rollouts (:func:`mechcliff.generation.encode_rollouts`).
        probe: the refusal probe (:func:`mechcliff.probe.fit_probe` or ``LinearProbe.load``).
        groups: a group name per example (e.g. ``"harmless"``, ``"harmful_jailbreak"``); default ``"all"``.
        ids: an id per example, kept with the trace.
        plateau: which plateau defines ``ms``: ``"mean"`` (default) or ``"max"`` of the thinking scores.
        batch_size: examples per forward pass (at most).
        max_tokens: padded tokens per forward pass (at most; rows run in chunks of similar length).
    """
    from mechcliff.errors import MechcliffError

    if plateau not in ("mean", "max"):
        raise MechcliffError(f"plateau must be 'mean' or 'max', got {plateau!r}")
    probe.check_model(handle)
    scores = probe_scores_all_positions(handle, batch, probe, batch_size, max_tokens)
    think_end = batch.position("think_end")
    stats: dict[str, list[float]] = {k: [] for k in (*STAT_KEYS, "t_cliff")}
    t_start, t_stop, t_end, a_start = [], [], [], []
    for i, sc in enumerate(scores):
        pad = batch.pad_lengths[i]
        th = batch.spans[i]["thinking"]
        te = int(think_end[i]) - pad if think_end[i] >= 0 else -1
        st = cliff_stats(sc, (th[0] - pad, th[1] - pad), te, plateau)
        for k in stats:
            stats[k].append(st[k])
        t_start.append(th[0] - pad)
        t_stop.append(th[1] - pad)
        t_end.append(te)
        a_start.append(batch.spans[i]["answer"][0] - pad)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in scores])]).astype(np.int64)
    return RefusalTrace(
        scores_flat=np.concatenate(scores).astype(np.float32), offsets=offsets,
        thinking_start=np.asarray(t_start, dtype=np.int64), thinking_end=np.asarray(t_stop, dtype=np.int64),
        think_end=np.asarray(t_end, dtype=np.int64), answer_start=np.asarray(a_start, dtype=np.int64),
        groups=list(groups) if groups is not None else ["all"] * len(scores),
        ids=list(ids) if ids is not None else [None] * len(scores),
        stats=stats, probe_layer=probe.layer, plateau=plateau, model_id=handle.model_id,
    )
