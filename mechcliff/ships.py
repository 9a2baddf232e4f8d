"""Ships head importance (Zhou et al., "On the Role of Attention Heads in LLM Safety", arXiv 2410.13708).

* :func:`ships_scores` -- per query, ``Ships(q, h) = KL(p(q; θ) || p(q; θ \\ h))`` between the next-token
  distributions at one position (default: the last token) with and without head ``h``. "Without" is
  ``scale_q`` (undifferentiated attention: the head's query times ``eps``, 1e-5 as in the authors' search) or
  ``scale_z`` (scaling contribution: the head's output times ``eps``). Heads of one layer are batched as
  replicas of the batch, each replica ablating one head, starting at that layer from the cached ``resid_pre``.
* :func:`generalized_ships` -- the dataset-level score: the principal angle (degrees) between the top left
  singular vectors of the ``[n_queries, d_model]`` matrices of last-layer, last-position activations of the
  model with and without the heads; :func:`sahara` greedily grows a group of heads (up to 5) by that score.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np
import torch

from mechcliff.chat import EncodedBatch
from mechcliff.errors import MechcliffError
from mechcliff.head_scores import PerHeadScores
from mechcliff.interventions import _query_hook_name, head_label, intervene, validate
from mechcliff.model.capture import act_name, capture, forward, layer_of
from mechcliff.results import Result

if TYPE_CHECKING:
    from mechcliff.model.handle import ModelHandle

SHIPS_MODES = ("scale_q", "scale_z")


@dataclasses.dataclass
class HeadImportance(PerHeadScores, Result):
    """Per-example and mean Ships score (KL, nats) of every head."""

    KIND: ClassVar[str] = "ships"
    per_example: np.ndarray  # [example, layer, head]
    mode: str
    eps: float
    model_id: str = ""

    def plot(self, highlight: list[tuple[int, int]] | None = None):
        from mechcliff.plotting import layer_head_heatmap

        return layer_head_heatmap(self.mean, title=f"Ships head importance ({self.mode}, ε={self.eps:g})",
                                  colorbar_title="KL(base ‖ ablated), nats", highlight=highlight, signed=False)

    def summary_rows(self) -> list[tuple[str, str]]:
        return [("examples", str(self.per_example.shape[0])), ("mode", f"{self.mode} ε={self.eps:g}"),
                ("top heads", ", ".join(self.top(5)))]


def _kl(base_logits: torch.Tensor, abl_logits: torch.Tensor) -> torch.Tensor:
    lp, lq = torch.log_softmax(base_logits.double(), -1), torch.log_softmax(abl_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _check(handle: ModelHandle, batch: EncodedBatch, mode: str, eps: float, position: Any) -> torch.Tensor:
    if mode not in SHIPS_MODES:
        raise MechcliffError(f"Ships mode must be one of {', '.join(SHIPS_MODES)}, not {mode!r}")
    validate(handle, [], mode, eps)
    return batch.require(position, "the requested position")


@torch.no_grad()
def ships_scores(
    handle: ModelHandle, batch: EncodedBatch, *, mode: str = "scale_q", eps: float = 1e-5, position: Any = "last",
    heads: Sequence[Any] | None = None, max_rows: int = 64,
) -> HeadImportance:
    """Ships KL of every head (or ``heads``) on each example of ``batch``: KL(base ‖ ablated) of the next-token
    distribution at ``position`` when that one head is ablated.

    Args:
        handle: the loaded model (:func:`mechcliff.load_model`).
        batch: the encoded prompts (e.g. harmful prompts, :func:`mechcliff.chat.encode`).
        mode: the ablation: ``"scale_q"`` (queries scaled by ``eps``: uniform attention, as Ships) or ``"scale_z"``
            (the head's output scaled by ``eps``).
        eps: the scale factor of the ablation (Ships' ε).
        position: where the next-token distributions are compared (an anchor, an int or a per-example tensor).
        heads: the heads to score; default all.
        max_rows: the most rows (examples × heads) in one forward (at least ``len(batch)``).
    """
    pos = _check(handle, batch, mode, eps, position)
    B = len(batch)
    if max_rows < B:
        raise MechcliffError(f"max_rows ({max_rows}) must be at least the number of examples ({B})")
    todo = ([(l, h) for l in range(handle.n_layers) for h in range(handle.n_heads)] if heads is None
            else validate(handle, heads, mode, eps))
    store: dict[int, torch.Tensor] = {}

    def keep(x: torch.Tensor, hook: Any) -> None:
        store[layer_of(hook.name)] = x.detach().clone()

    layers = sorted({l for l, _ in todo})
    base = forward(handle, batch.tokens, batch.attention_mask, hooks=[(act_name("resid_pre", l), keep) for l in layers])
    base_at = base[torch.arange(B), pos]
    out = np.full((B, handle.n_layers, handle.n_heads), np.nan)
    per_forward = max(1, max_rows // B)
    for l in layers:
        hs_all = [h for ll, h in todo if ll == l]
        for i in range(0, len(hs_all), per_forward):
            hs = hs_all[i:i + per_forward]
            K = len(hs)
            rows = torch.arange(K * B)
            head_of_row = torch.tensor(hs).repeat_interleave(B)

            def ablate(t: torch.Tensor, hook: Any) -> torch.Tensor:
                t = t.clone()
                t[rows, :, head_of_row] = t[rows, :, head_of_row] * eps
                return t

            name = _query_hook_name(handle, l) if mode == "scale_q" else act_name("z", l)
            logits = forward(handle, store[l].repeat(K, 1, 1), batch.attention_mask.repeat(K, 1), start_at_layer=l,
                             hooks=[(name, ablate)])
            kl = _kl(base_at.repeat(K, 1), logits[rows, pos.repeat(K)])
            out[:, l, hs] = kl.reshape(K, B).T.cpu().numpy()
    return HeadImportance(per_example=out, mode=mode, eps=float(eps), model_id=handle.model_id)


@torch.no_grad()
def ships_reference(handle: ModelHandle, batch: EncodedBatch, *, mode: str = "scale_q", eps: float = 1e-5,
                    position: Any = "last", heads: Sequence[Any] | None = None) -> HeadImportance:
    """One full forward per head under :func:`~mechcliff.interventions.intervene` (the test reference)."""
    pos = _check(handle, batch, mode, eps, position)
    B = len(batch)
    todo = ([(l, h) for l in range(handle.n_layers) for h in range(handle.n_heads)] if heads is None
            else validate(handle, heads, mode, eps))
    base = forward(handle, batch.tokens, batch.attention_mask)[torch.arange(B), pos]
    out = np.full((B, handle.n_layers, handle.n_heads), np.nan)
    for l, h in todo:
        with intervene(handle, [(l, h)], mode=mode, gamma=eps):
            abl = forward(handle, batch.tokens, batch.attention_mask)[torch.arange(B), pos]
        out[:, l, h] = _kl(base, abl).cpu().numpy()
    return HeadImportance(per_example=out, mode=mode, eps=float(eps), model_id=handle.model_id)


@torch.no_grad()
def _last_layer_states(handle: ModelHandle, batch: EncodedBatch, pos: torch.Tensor) -> torch.Tensor:
    name = act_name("resid_post", handle.n_layers - 1)
    (chunk,) = capture(handle, batch, {name: lambda x, where: x.double()}, at=pos, batch_size=len(batch))
    return chunk.values[name]


def _top_left_singular(m: torch.Tensor) -> torch.Tensor:
    u, _, _ = torch.linalg.svd(m, full_matrices=False)
    return u[:, 0]


def generalized_ships(handle: ModelHandle, batch: EncodedBatch, heads: Sequence[Any], *, mode: str = "scale_q",
                      eps: float = 1e-5, position: Any = "last", base_vector: torch.Tensor | None = None) -> float:
    """Principal angle (degrees) between the top left singular vectors of last-layer activations with and without
    ``heads`` (arXiv 2410.13708, generalized Ships with ``r_main = 1``)."""
    pos = _check(handle, batch, mode, eps, position)
    if len(batch) < 2:
        raise MechcliffError("generalized Ships needs at least 2 queries")
    u0 = base_vector if base_vector is not None else _top_left_singular(_last_layer_states(handle, batch, pos))
    with intervene(handle, heads, mode=mode, gamma=eps):
        u1 = _top_left_singular(_last_layer_states(handle, batch, pos))
    cos = float(torch.clamp(torch.abs(u0 @ u1), max=1.0))
    return float(np.degrees(np.arccos(cos)))


@dataclasses.dataclass
class SaharaResult(Result):
    """The greedy group search: chosen heads in order and the score after each step."""

    KIND: ClassVar[str] = "sahara"
    heads: list[str]
    scores: list[float]
    mode: str
    eps: float
    model_id: str = ""

    def plot(self):
        """The generalized Ships angle of the group after each greedy step, one tick per head added."""
        import plotly.graph_objects as go

        from mechcliff.plotting import OKABE_ITO, TEMPLATE

        labels = [f"+{h}" if i else h for i, h in enumerate(self.heads)]
        fig = go.Figure(go.Scatter(x=labels, y=list(self.scores), mode="lines+markers", name="group angle",
                                   line=dict(color=OKABE_ITO[0], width=2), marker=dict(size=7),
                                   hovertemplate="%{x}<br>%{y:.2f}°<extra></extra>"))
        fig.update_layout(template=TEMPLATE, title=f"Sahara greedy head-group search ({self.mode}, ε={self.eps:g})",
                          height=420)
        fig.update_xaxes(title_text="head added at each step", type="category")
        fig.update_yaxes(title_text="generalized Ships angle (degrees)", rangemode="tozero")
        return fig

    def summary_rows(self) -> list[tuple[str, str]]:
        return [(f"step {i + 1}", f"{h}: {s:.2f}°") for i, (h, s) in enumerate(zip(self.heads, self.scores))]


def sahara(handle: ModelHandle, batch: EncodedBatch, *, steps: int = 3, candidates: Sequence[Any] | None = None,
           mode: str = "scale_q", eps: float = 1e-5, position: Any = "last", progress: bool = False) -> SaharaResult:
    """Greedy search (at most 5 steps, as in the paper): add the head whose ablation, together with the group so
    far, maximises the generalized Ships angle."""
    from tqdm.auto import tqdm

    if not 1 <= steps <= 5:
        raise MechcliffError(f"steps must be between 1 and 5, got {steps}")
    pos = _check(handle, batch, mode, eps, position)
    pool = ([(l, h) for l in range(handle.n_layers) for h in range(handle.n_heads)] if candidates is None
            else validate(handle, candidates, mode, eps))
    u0 = _top_left_singular(_last_layer_states(handle, batch, pos))
    group: list[tuple[int, int]] = []
    scores: list[float] = []
    for _ in tqdm(range(steps), desc="sahara", disable=not progress, leave=False):
        best = max(((generalized_ships(handle, batch, group + [h], mode=mode, eps=eps, position=position,
                                       base_vector=u0), h) for h in pool if h not in group), key=lambda t: t[0])
        group.append(best[1])
        scores.append(best[0])
    return SaharaResult(heads=[head_label(h) for h in group], scores=scores, mode=mode, eps=float(eps),
                        model_id=handle.model_id)
