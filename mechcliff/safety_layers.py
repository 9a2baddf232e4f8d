"""Safety-layer localisation ("CoT is Not the Chain of Truth", arXiv 2602.04856; its code ``CoT_Analysis/Layer.py``).

Per layer ``l``, the mean cosine similarity of last-token hidden states between pairs of texts:

* ``cos_nn(l)``: Safe–Safe pairs (the paper's N–N), ``cos_mm(l)``: Unsafe–Unsafe (M–M),
  ``cos_nm(l)``: Safe–Unsafe (N–M);
* the signal ``GAP(l) = cos_nn(l) − cos_nm(l)``;
* the *safety-critical layers*: the window of ``w`` consecutive layers (``w = 3`` in the paper) with the largest
  mean GAP (the first such window on ties, as the authors' ``best_window_for_w``).

Which hidden states (following the authors' code): the hidden state at the *last token* of each text, at every
layer, the embedding skipped. Layer ``l`` (0-based) is Hugging Face's ``hidden_states[l + 1]``, i.e.
``blocks.{l}.hook_resid_post``, except for the last layer, where Hugging Face's ``hidden_states[-1]`` is taken after
the model's final norm: with ``final_norm=True`` (default, = the authors' numbers) the last layer is read at
``ln_final.hook_out``; ``final_norm=False`` reads the raw ``resid_post`` of the last block. The authors drop the
last layer for Qwen models: ``drop_last=True`` does that. Cosine similarity is ``a·b / (‖a‖‖b‖ + 1e-12)``.

What the last token is: the paper feeds the chain-of-thought text alone; mechcliff reads encoded rollouts
(:class:`~mechcliff.chat.EncodedBatch`: chat template + prompt + thinking + closing template) up to ``position``,
default ``"think_end"``: the last token before the answer (with thinking, the end of the closing template after
``</think>``; without a thinking block, the last token of the generation prompt). So thinking-on and thinking-off
runs are read at the same point, the one the refusal probe uses; pass ``position="last"`` or any anchor / index.

Which pairs are averaged: by default (``n_pairs=None``) *all* pairs: within a group every unordered pair of two
different texts (``i < j``; self-pairs, whose cosine is 1, are excluded), across groups every (safe, unsafe) pair.
This is the exact expectation of the authors' estimate, which averages ``r = 20`` random pairs of each type
(within a group two distinct texts drawn without replacement, across groups one of each drawn independently);
``n_pairs=r`` reproduces that sampling (seeded). Standard deviations are over pairs, as in the authors' plots.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import numpy as np

from mechcliff.errors import MechcliffError
from mechcliff.model.capture import MAX_TOKENS, act_name, capture
from mechcliff.model.handle import ModelHandle
from mechcliff.results import Result

COS_EPS = 1e-12


# --------------------------------------------------------------------------- numerics (no model)


def _check_window(window: Any, n_layers: int) -> int:
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)):
        raise MechcliffError(f"window must be a whole number of layers, got {window!r}")
    w = int(window)
    if w < 1:
        raise MechcliffError(f"window must be at least 1 layer, got {w}")
    if w > n_layers:
        raise MechcliffError(f"window of {w} layers is larger than the {n_layers} layer(s) available; "
                             f"use a window between 1 and {n_layers}")
    return w


def best_window(signal: Sequence[float] | np.ndarray, window: int = 3) -> tuple[int, float]:
    """``(start, score)``: the first window of ``window`` consecutive entries of ``signal`` with the largest mean.

    Indices are positions in ``signal``. NaN entries make a window's mean NaN, which never wins.
    """
    s = np.asarray(signal, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise MechcliffError(f"signal must be a non-empty 1-D array, got shape {s.shape}")
    w = _check_window(window, s.size)
    means = np.convolve(s, np.ones(w) / w, mode="valid")  # means[k] = mean(s[k:k+w])
    best, score = 0, -np.inf
    for k, m in enumerate(means):  # strict '>' keeps the first maximum, as the authors' loop
        if np.isfinite(m) and m > score:
            best, score = k, float(m)
    if not np.isfinite(score):
        raise MechcliffError("every window of the GAP signal contains NaN; cannot choose a window")
    return best, score


def _pair_cosines(a: np.ndarray, b: np.ndarray, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """Cosines ``[pair, layer]`` of ``a[ia[k]]`` with ``b[ib[k]]`` (``a``/``b``: ``[example, layer, d]``)."""
    dots = np.einsum("pld,pld->pl", a[ia], b[ib])
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    return dots / (na[ia] * nb[ib] + COS_EPS)


def _pairs(n_a: int, n_b: int | None, n_pairs: int | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs: within one group (``n_b is None``; two different examples) or across two groups."""
    if n_b is None:
        if n_pairs is None:
            i, j = np.triu_indices(n_a, k=1)
            return i, j
        draws = np.array([rng.choice(n_a, size=2, replace=False) for _ in range(n_pairs)])
        return draws[:, 0], draws[:, 1]
    if n_pairs is None:
        gi, gj = np.meshgrid(np.arange(n_a), np.arange(n_b), indexing="ij")
        return gi.ravel(), gj.ravel()
    return rng.integers(0, n_a, size=n_pairs), rng.integers(0, n_b, size=n_pairs)


def layer_cosines(
    safe: np.ndarray, unsafe: np.ndarray, *, n_pairs: int | None = None, seed: int = 0,
) -> dict[str, Any]:
    """Mean and std over pairs of the per-layer cosine similarity, within and across the two groups.

    ``safe``: ``[n_safe, layer, d]``, ``unsafe``: ``[n_unsafe, layer, d]`` hidden states. Returns arrays ``[layer]``
    ``cos_nn``, ``cos_mm``, ``cos_nm``, ``std_nn``, ``std_mm``, ``std_nm`` and the pair counts. See the module
    docstring for which pairs (all distinct pairs by default; ``n_pairs`` random ones, as the authors).
    """
    safe = np.asarray(safe, dtype=np.float64)
    unsafe = np.asarray(unsafe, dtype=np.float64)
    for name, x in (("safe", safe), ("unsafe", unsafe)):
        if x.ndim != 3:
            raise MechcliffError(f"{name} hidden states must be [example, layer, d_model], got shape {x.shape}")
        if x.shape[0] == 0:
            raise MechcliffError(f"the {name} group is empty: safety-layer localisation needs texts in both groups")
        if x.shape[0] < 2:
            raise MechcliffError(f"the {name} group has only {x.shape[0]} text; within-group similarity needs at "
                                 "least 2 texts per group")
    if safe.shape[1:] != unsafe.shape[1:]:
        raise MechcliffError(f"safe and unsafe hidden states differ in shape: {safe.shape[1:]} vs {unsafe.shape[1:]}")
    if n_pairs is not None and (isinstance(n_pairs, bool) or int(n_pairs) < 1):
        raise MechcliffError(f"n_pairs must be a positive number of pairs (or None for all pairs), got {n_pairs!r}")
    out: dict[str, Any] = {}
    # the authors seed the three pair types separately (seed, seed + 100, seed + 1000)
    for key, a, b, offset in (("nn", safe, None, 0), ("mm", unsafe, None, 100), ("nm", safe, unsafe, 1000)):
        rng = np.random.default_rng(seed + offset)
        ia, ib = _pairs(a.shape[0], None if b is None else b.shape[0], n_pairs, rng)
        cos = _pair_cosines(a, a if b is None else b, ia, ib)
        out[f"cos_{key}"] = cos.mean(0)
        out[f"std_{key}"] = cos.std(0)
        out[f"pairs_{key}"] = int(len(ia))
    return out


# --------------------------------------------------------------------------- the result


@dataclasses.dataclass(repr=False)  # the short repr of Result (summary_rows)
class SafetyLayers(Result):
    """Per-layer cosine similarity within / across safe and unsafe texts, GAP and the best window of layers."""

    KIND: ClassVar[str] = "safety_layers"
    cos_nn: np.ndarray  # [layer] mean cosine, Safe–Safe pairs
    cos_mm: np.ndarray  # [layer] Unsafe–Unsafe
    cos_nm: np.ndarray  # [layer] Safe–Unsafe
    std_nn: np.ndarray
    std_mm: np.ndarray
    std_nm: np.ndarray
    layers: list[int]  # model layer of each entry (0-based; = HF hidden_states[l + 1])
    window: int
    start: int  # model layer where the best window starts
    score: float  # mean GAP over the window
    n_safe: int
    n_unsafe: int
    n_pairs: dict[str, int] = dataclasses.field(default_factory=dict)  # pairs averaged per type (nn, mm, nm)
    sampling: str = "all pairs"  # or "r random pairs (seed s)"
    position: str = "think_end"
    model_id: str = ""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def gap(self) -> np.ndarray:
        """``GAP(l) = cos_nn(l) − cos_nm(l)``, ``[layer]``."""
        return np.asarray(self.cos_nn) - np.asarray(self.cos_nm)

    @property
    def safety_layers(self) -> list[int]:
        """The model layers of the best window (the paper's safety-critical layers)."""
        return list(range(int(self.start), int(self.start) + int(self.window)))

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"layer": self.layers, "cos_nn": self.cos_nn, "cos_mm": self.cos_mm, "cos_nm": self.cos_nm,
                             "std_nn": self.std_nn, "std_mm": self.std_mm, "std_nm": self.std_nm, "gap": self.gap,
                             "in_window": [l in self.safety_layers for l in self.layers]})

    def summary_rows(self) -> list[tuple[str, str]]:
        sl = self.safety_layers
        return [("model", self.model_id or "n/a"), ("texts", f"{self.n_safe} safe, {self.n_unsafe} unsafe"),
                ("pairs", self.sampling), ("position", str(self.position)),
                ("safety layers", f"{sl[0]}–{sl[-1]} (w={self.window})"), ("mean GAP in window", f"{self.score:.4f}"),
                ("max GAP", f"{float(np.nanmax(self.gap)):.4f} at layer {self.layers[int(np.nanargmax(self.gap))]}")]

    def plot(self, title: str | None = None):
        """Cosine similarity per layer (Safe–Safe, Unsafe–Unsafe, Safe–Unsafe; ± std bands) above the GAP per
        layer (bars); the best window of ``window`` layers is shaded across both."""
        import plotly.graph_objects as go

        from mechcliff.plotting import OKABE_ITO, TEMPLATE, _rgba, _text

        # one x axis (layer) under two stacked y axes: cosine similarity (top) and GAP (bottom)
        x = np.asarray(self.layers, dtype=float)
        fig = go.Figure()
        for k, (key, label) in enumerate((("nn", "Safe–Safe"), ("mm", "Unsafe–Unsafe"), ("nm", "Safe–Unsafe"))):
            mean, std = np.asarray(getattr(self, f"cos_{key}")), np.asarray(getattr(self, f"std_{key}"))
            color = OKABE_ITO[k]
            fig.add_trace(go.Scatter(
                x=np.concatenate([x, x[::-1]]), y=np.concatenate([mean + std, (mean - std)[::-1]]), mode="lines",
                fill="toself",
                fillcolor=_rgba(color, 0.15), line=dict(width=0, color=color), hoverinfo="skip", showlegend=False,
                legendgroup=label, name=f"{label} ± std"))
            fig.add_trace(go.Scatter(
                x=x, y=mean, mode="lines+markers", name=label, legendgroup=label, line=dict(color=color, width=2),
                marker=dict(size=4), customdata=std,
                hovertemplate="layer %{x}<br>" + label + " %{y:.4f} ± %{customdata:.4f}<extra></extra>"))
        fig.add_trace(go.Bar(x=x, y=self.gap, yaxis="y2", name="GAP", marker=dict(color="#777777"),
                             hovertemplate="layer %{x}<br>GAP %{y:.4f}<extra></extra>"))
        sl = self.safety_layers
        fig.add_shape(type="rect", xref="x", yref="paper", x0=sl[0] - 0.5, x1=sl[-1] + 0.5, y0=0, y1=1,
                      fillcolor=OKABE_ITO[3], opacity=0.2, line_width=0, layer="below", name="safety layers")
        fig.add_trace(go.Scatter(  # legend entry for the shaded window
            x=[None], y=[None], mode="markers", name=f"safety layers {sl[0]}–{sl[-1]}", hoverinfo="skip",
            marker=dict(symbol="square", size=12, color=OKABE_ITO[3], opacity=0.4)))
        fig.update_layout(
            template=TEMPLATE, height=520, hovermode="closest", bargap=0.15,
            title=dict(text=_text(title or f"Safety-layer localisation (best {self.window}-layer window: "
                                           f"{sl[0]}–{sl[-1]})")),
            legend=dict(x=0.01, xanchor="left", y=0.4, yanchor="bottom"),
            xaxis=dict(title=dict(text="layer"), anchor="y2", dtick=1 if x.size <= 40 else None),
            yaxis=dict(title=dict(text="cosine similarity"), domain=[0.38, 1.0]),
            yaxis2=dict(title=dict(text="GAP"), domain=[0.0, 0.3], anchor="x", zeroline=True,
                        zerolinecolor="#999999"),
        )
        return fig


def safety_layers_from_states(
    safe: np.ndarray, unsafe: np.ndarray, *, window: int = 3, n_pairs: int | None = None, seed: int = 0,
    layers: Sequence[int] | None = None, position: str = "think_end", model_id: str = "",
    meta: dict[str, Any] | None = None,
) -> SafetyLayers:
    """:class:`SafetyLayers` from hidden states ``[example, layer, d]`` of the two groups (no model needed)."""
    c = layer_cosines(safe, unsafe, n_pairs=n_pairs, seed=seed)
    n_layers = int(np.asarray(safe).shape[1])
    layers = list(range(n_layers)) if layers is None else [int(l) for l in layers]
    if len(layers) != n_layers:
        raise MechcliffError(f"layers names {len(layers)} layers but the hidden states have {n_layers}")
    start, score = best_window(c["cos_nn"] - c["cos_nm"], window)
    return SafetyLayers(
        cos_nn=c["cos_nn"], cos_mm=c["cos_mm"], cos_nm=c["cos_nm"], std_nn=c["std_nn"], std_mm=c["std_mm"],
        std_nm=c["std_nm"], layers=layers, window=int(window), start=layers[start], score=score,
        n_safe=int(np.asarray(safe).shape[0]), n_unsafe=int(np.asarray(unsafe).shape[0]),
        n_pairs={k: c[f"pairs_{k}"] for k in ("nn", "mm", "nm")},
        sampling="all pairs" if n_pairs is None else f"{int(n_pairs)} random pairs per type (seed {seed})",
        position=str(position), model_id=model_id, meta=dict(meta or {}),
    )


# --------------------------------------------------------------------------- the model side


def last_token_states(
    handle: ModelHandle, batch: Any, *, position: Any = "think_end", final_norm: bool = True, batch_size: int = 16,
) -> np.ndarray:
    """Hidden states ``[example, layer, d_model]`` at one position per example, for every layer (see the module
    docstring: layer ``l`` = HF ``hidden_states[l + 1]``; the last one after the final norm when ``final_norm``)."""
    import torch

    if len(batch) == 0:
        raise MechcliffError("no texts to read hidden states from (empty batch)")
    pos_all = batch.require(position, "the requested position")
    L = handle.n_layers
    out = np.zeros((len(batch), L, handle.d_model), dtype=np.float64)
    names = [act_name("resid_post", l) for l in range(L - 1 if final_norm else L)]
    names += [act_name("ln_final")] if final_norm else []  # read as layer L - 1
    read = {n: (lambda x, where: x.double()) for n in names}
    with torch.no_grad():
        for chunk in capture(handle, batch, read, at=pos_all, batch_size=batch_size, max_tokens=MAX_TOKENS):
            rows = chunk.where.index.numpy()
            for l, n in enumerate(names):
                out[rows, l] = chunk.values[n].numpy()
    return out


def safety_layers(
    handle: ModelHandle, safe: Any, unsafe: Any, *, window: int = 3, position: Any = "think_end", n_pairs: int | None = None,
    seed: int = 0, final_norm: bool = True, drop_last: bool = False, batch_size: int = 16,
    meta: dict[str, Any] | None = None,
) -> SafetyLayers:
    """Localise the safety-critical layers of ``handle`` from two encoded groups of texts.

    ``safe`` / ``unsafe``: :class:`~mechcliff.chat.EncodedBatch` (e.g. :func:`mechcliff.generation.encode_rollouts`
    of harmless and harmful rollouts). Hidden states are read at ``position`` (default ``"think_end"``); see the
    module docstring for the layer convention (``final_norm``, ``drop_last``) and the pairs averaged (``n_pairs``).
    """
    n_avail = handle.n_layers - (1 if drop_last else 0)
    _check_window(window, n_avail)
    for name, b in (("safe", safe), ("unsafe", unsafe)):
        if b is None or len(b) == 0:
            raise MechcliffError(f"the {name} group is empty: safety-layer localisation needs texts in both groups")
    a = last_token_states(handle, safe, position=position, final_norm=final_norm, batch_size=batch_size)
    b = last_token_states(handle, unsafe, position=position, final_norm=final_norm, batch_size=batch_size)
    if drop_last:
        a, b = a[:, :-1], b[:, :-1]
    m = {"final_norm": bool(final_norm), "drop_last": bool(drop_last), **(meta or {})}
    return safety_layers_from_states(a, b, window=window, n_pairs=n_pairs, seed=seed, layers=range(n_avail),
                                     position=str(position), model_id=getattr(handle, "model_id", ""), meta=m)


# --------------------------------------------------------------------------- groups and output of the commands (mechcliff.cli.cot)


def prepare_groups(
    handle: ModelHandle, safe_prompts: Sequence[Any], unsafe_prompts: Sequence[Any], *, thinking: bool = True,
    max_think_tokens: int | None = None, max_answer_tokens: int | None = None, seed: int = 0, batch_size: int = 16,
    progress: bool = False,
) -> tuple[Any, Any, list[Any]]:
    """Generate rollouts (thinking on or off) for both prompt groups and encode them: ``(safe, unsafe, rollouts)``.

    Thinking on: the model writes its thinking, which is read (prompt + thinking + closing template). Thinking off:
    ``enable_thinking=False`` (templates that know it, e.g. Qwen3 or the organism, write an empty think block;
    others get no thinking block) and the text read is the prompt's template up to the answer.
    ``max_think_tokens`` / ``max_answer_tokens``: None = 4,096 / 512 on real models, 64 / 16 on the organisms
    (:func:`mechcliff.model.presets.generation_budgets`).
    """
    from mechcliff.generation import encode_rollouts, generate_rollouts
    from mechcliff.model.presets import COT_BUDGETS, generation_budgets

    max_think_tokens, max_answer_tokens = generation_budgets(handle, max_think_tokens, max_answer_tokens, short=COT_BUDGETS)
    if not safe_prompts:
        raise MechcliffError("the safe (harmless) prompt group is empty")
    if not unsafe_prompts:
        raise MechcliffError("the unsafe (harmful) prompt group is empty")

    def gen(prompts: Sequence[Any], desc: str) -> list[Any]:
        return generate_rollouts(handle, list(prompts), max_think_tokens=max_think_tokens,
                                 max_answer_tokens=max_answer_tokens, seed=seed, batch_size=batch_size,
                                 enable_thinking=thinking, progress=progress, desc=desc)

    ro_safe = gen(safe_prompts, "safe")
    ro_unsafe = gen(unsafe_prompts, "unsafe")
    return (encode_rollouts(handle, ro_safe, enable_thinking=thinking),
            encode_rollouts(handle, ro_unsafe, enable_thinking=thinking), ro_safe + ro_unsafe)


def load_groups(safe_file: str | None, unsafe_file: str | None, n_per_group: int | None) -> tuple[list, list]:
    """Safe / unsafe prompts: the files given, else the built-in ``harmless`` / ``harmful`` groups."""
    from mechcliff.data import builtin_prompts, load_prompts

    if (safe_file is None) != (unsafe_file is None):
        raise MechcliffError("give both --safe FILE and --unsafe FILE, or neither (built-in harmless vs harmful)")
    if safe_file is not None and unsafe_file is not None:  # both or neither (checked above)
        safe, unsafe = load_prompts(safe_file, group="safe"), load_prompts(unsafe_file, group="unsafe")
    else:
        safe, unsafe = builtin_prompts("harmless"), builtin_prompts("harmful")
    if n_per_group is not None:
        if n_per_group < 2:
            raise MechcliffError(f"--n-per-group must be at least 2, got {n_per_group}")
        safe, unsafe = safe[:n_per_group], unsafe[:n_per_group]
    return safe, unsafe


def write_result(result: SafetyLayers, out: str, name: str) -> tuple[Any, Any]:
    """Save ``result`` to ``out/name`` and its figure to ``out/name.html`` (offline, plotly.js inlined)."""
    from pathlib import Path

    from mechcliff.files import atomic_write_text

    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise MechcliffError(f"--out {out} exists and is not a folder")
    path = result.save(out_dir / name)
    html = out_dir / f"{name}.html"
    atomic_write_text(html, result.plot().to_html(include_plotlyjs=True, full_html=True))
    return path, html
