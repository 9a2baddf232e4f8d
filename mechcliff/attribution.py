"""Direct probe attribution (DPA): which components write the probe's logit (arXiv 2510.06036).

For a probe on ``resid_post[L]`` the logit at position ``t`` decomposes exactly (pre-norm architectures):

    w · resid_post[L]_t + b = w · embed_t + Σ_{l≤L} Σ_h z[l,h]_t · (W_O[l,h] w) + Σ_{l≤L} w · b_O[l]
                              + Σ_{l≤L} w · mlp_out[l]_t + b

Per head we compute ``s[l,h] = z[l,h]_t · u[l,h]`` with ``u[l,h] = W_O[l,h] @ w`` precomputed, reducing ``z`` at the
wanted position as soon as ``hook_z`` fires: memory is O(batch × heads), and ``use_attn_result`` is never needed.
Negative ``s`` = the head writes against refusal (a refusal-suppression head). The paper's code scores heads by
``s / ||w||`` averaged over examples; dividing by ``||w||`` or adding the probe bias does not change the ranking,
so we report the plain contribution to the logit and the bias separately. ``max_abs_error`` is
``|Σ components − logit|``; on post-norm architectures (Gemma 2/3) the result is flagged ``exact=False``.
Heads in layers after ``L`` have no direct effect on the probe and are NaN.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from mechcliff.chat import EncodedBatch
from mechcliff.head_scores import PerHeadScores, head_label, rank_heads
from mechcliff.model.capture import MAX_TOKENS, act_name, capture
from mechcliff.results import Result

if TYPE_CHECKING:
    from mechcliff.model.handle import ModelHandle


@dataclasses.dataclass
class HeadAttribution(PerHeadScores, Result):
    """Per-example and mean DPA of every head, plus embedding, MLP and bias terms."""

    KIND: ClassVar[str] = "head_attribution"
    per_example: np.ndarray  # [example, layer, head]
    mlp: np.ndarray  # [example, layer]
    embed: np.ndarray  # [example]
    attn_bias: np.ndarray  # [example] sum over layers of w · b_O
    logit: np.ndarray  # [example] the probe logit actually read at the position
    probe_bias: float
    probe_layer: int
    positions: list[int]
    # True only when the components sum to the logit to float32 accumulation: a pre-norm architecture (no norms
    # after the attention) *and* float32 weights. In bfloat16 / float16 the decomposition is still the right one,
    # but every activation it sums was rounded in the forward (a residual of ~1e-2 on logits of a few units)
    exact: bool = True
    model_id: str = ""
    groups: list[str] = dataclasses.field(default_factory=list)
    dtype: str = "float32"  # the model's weights (results from before dtypes: float32)
    decomposition_exact: bool = True  # the architecture's decomposition is exact (no post-attention norms)
    max_residual: float | None = None  # max |sum of components - logit| measured when the result was made

    @property
    def exactness(self) -> str:
        """What the sum of the components is worth, in words."""
        if not self.decomposition_exact:
            return "not exact: post-attention norms (a linearised attribution)"
        if self.exact:
            return "exact to float32 accumulation"
        return f"exact decomposition of {self.dtype} activations: sums to the logit within {self.max_abs_error:.1e}"

    @property
    def total(self) -> np.ndarray:
        """Sum of all components per example (equals ``logit`` up to float error when exact)."""
        heads = np.nansum(self.per_example, axis=(1, 2))
        return self.embed + heads + self.attn_bias + self.mlp.sum(1) + self.probe_bias

    @property
    def errors(self) -> np.ndarray:
        return np.abs(self.total - self.logit)

    @property
    def max_abs_error(self) -> float:
        return float(self.errors.max()) if len(self.errors) else 0.0

    def ranked_heads(self, sign: str = "neg") -> list[tuple[int, int]]:
        """Heads sorted by mean contribution: most negative first (``sign="neg"``) or most positive first."""
        return rank_heads(self.mean, descending=(sign == "pos"))

    def top(self, k: int, sign: str = "neg") -> list[str]:
        """Labels (``"L2H3"``) of the ``k`` strongest suppression (``neg``) or promotion (``pos``) heads."""
        return [head_label(h) for h in self.ranked_heads(sign)[:k]]

    def to_dataframe(self):
        import pandas as pd

        m = self.mean
        rows = [{"head": head_label((l, h)), "layer": l, "index": h, "mean": float(m[l, h]),
                 "std": float(np.nanstd(self.per_example[:, l, h]))}
                for l in range(m.shape[0]) for h in range(m.shape[1])]
        return pd.DataFrame(rows)

    def plot(self, highlight: list[tuple[int, int]] | None = None, title: str = "Direct probe attribution"):
        from mechcliff.plotting import layer_head_heatmap

        return layer_head_heatmap(self.mean, title=title, highlight=highlight)

    def summary_rows(self) -> list[tuple[str, str]]:
        return [("examples", str(self.per_example.shape[0])), ("probe layer", str(self.probe_layer)),
                ("top suppression heads", ", ".join(self.top(5))), ("exact", str(self.exact)),
                ("exactness", self.exactness), ("dtype", self.dtype),
                ("max |sum - logit|", f"{self.max_abs_error:.2e}")]


@torch.no_grad()
def direct_probe_attribution(
    handle: ModelHandle, batch: EncodedBatch, probe: Any, *, position: Any = "think_end", batch_size: int = 16,
    groups: list[str] | None = None, max_tokens: int | None = MAX_TOKENS,
) -> HeadAttribution:
    """DPA of every head (and embedding / MLP / bias terms) at one position per example.

    ``position`` is an anchor (``"think_end"``...), an int, or a per-example index tensor in padded coordinates
    (e.g. ``t_cliff`` from :func:`mechcliff.trace.trace_refusal` via :func:`trace_positions`). Examples without a
    position (``-1``) are dropped.

    Args:
        handle: the loaded model (:func:`mechcliff.load_model`); must be the probe's model.
        batch: the encoded examples (:func:`mechcliff.generation.encode_rollouts`).
        probe: the refusal probe whose logit is attributed (:func:`mechcliff.probe.fit_probe`).
        position: the token attributed in each example (above).
        batch_size: examples per forward pass (at most).
        max_tokens: padded tokens per forward pass (at most; rows run in chunks of similar length).
        groups: a group name per example of ``batch``, kept with the result (of the examples not dropped).
    """
    from mechcliff.errors import MechcliffError

    probe.check_model(handle)
    pos_all = batch.position(position)
    keep = (pos_all >= 0).nonzero().flatten().tolist()
    if not keep:
        raise MechcliffError("no example has the requested position (did the thinking close?)")
    L, H = probe.layer, handle.n_heads
    w = torch.as_tensor(probe.w, dtype=torch.float32, device=handle.device)
    u = [torch.einsum("hdm,m->hd", handle.W_O(l).float(), w) for l in range(L + 1)]
    bias = float(sum(float(handle.b_O(l).float() @ w) for l in range(L + 1)))
    n = len(keep)
    per_example = np.full((n, handle.n_layers, H), np.nan, dtype=np.float64)
    mlp = np.zeros((n, handle.n_layers))
    embed = np.zeros(n)
    logit = np.zeros(n)
    def project(v: torch.Tensor) -> Any:
        return lambda x, where: (x.float() @ v.to(x.device)).double()

    def heads(l: int) -> Any:
        return lambda z, where: torch.einsum("bhd,hd->bh", z.float(), u[l].to(z.device)).double()

    readers = {act_name("z", l): heads(l) for l in range(L + 1)}
    readers |= {act_name("mlp_out", l): project(w) for l in range(L + 1)}
    readers[act_name("resid_pre", 0)] = project(w)
    readers[probe.hook_name] = lambda x, where: (x.float() @ w.to(x.device) + probe.b).double()
    row_of = {example: k for k, example in enumerate(keep)}  # chunks come in length order: place rows by example
    for chunk in capture(handle, batch, readers, at=pos_all, rows=keep, batch_size=batch_size, max_tokens=max_tokens,
                         pack=True):
        v = chunk.values
        sl = np.array([row_of[int(i)] for i in chunk.where.index])
        for l in range(L + 1):
            per_example[sl, l] = v[act_name("z", l)].numpy()
            mlp[sl, l] = v[act_name("mlp_out", l)].numpy()
        embed[sl] = v[act_name("resid_pre", 0)].numpy()
        logit[sl] = v[probe.hook_name].numpy()
    structural = bool(handle.exact_decomposition)
    dtype = str(getattr(handle, "dtype", torch.float32)).removeprefix("torch.")
    result = HeadAttribution(
        per_example=per_example, mlp=mlp, embed=embed, attn_bias=np.full(n, bias), logit=logit,
        probe_bias=float(probe.b), probe_layer=L, positions=[int(pos_all[i]) for i in keep],
        exact=structural and dtype == "float32", model_id=handle.model_id,
        groups=[groups[i] for i in keep] if groups is not None else [],
        dtype=dtype, decomposition_exact=structural,
    )
    result.max_residual = result.max_abs_error
    return result


def trace_positions(trace: Any, batch: EncodedBatch, key: str = "t_cliff") -> torch.Tensor:
    """Per-example padded positions of ``t_cliff`` (from a trace made on ``batch``); ``-1`` where undefined."""
    from mechcliff.errors import MechcliffError

    if len(trace) != len(batch):
        raise MechcliffError(
            f"the trace has {len(trace)} examples but the batch {len(batch)}: trace the same batch "
            "(or use trace.select(group) with a batch of that group)"
        )
    out = []
    for i in range(len(batch)):
        t = int(trace.stats[key][i])
        out.append(t + batch.pad_lengths[i] if t >= 0 else -1)
    return torch.tensor(out, dtype=torch.long)
