"""Activation patching of attention heads, batched over patch indices, reusing the unpatched prefix.

For each head ``(l, h)`` we run the *target* batch with that head's output ``z[l, h]`` at the target position
replaced by its value in the paired *source* run at the source position (per example: pair ``i`` of the source
batch goes with pair ``i`` of the target batch), and read a metric. The engine:

* batches ``K`` patch indices of the same layer into one forward by replicating the target batch ``K`` times
  (replica ``k`` patches head ``h_k``), chunked so that a forward holds at most ``max_rows`` rows;
* reuses the unpatched prefix: the tokens before the earliest patch position are run once with a KV cache and
  each chunk recomputes only the suffix (one token per row when patching at the last token); when a patch
  position is the very first token, chunks instead start at the patched layer from the target's cached
  ``resid_pre`` (``start_at_layer``), so layers before the patched one are not recomputed;
* stops at the probe layer for probe metrics (``stop_at_layer``);
* runs two unpatched forwards in all: the source batch once (every patched layer's ``z`` and the source metric
  together) and the target batch once (the target metric and the KV cache, cropped to the prefix).

``normalized = (patched - target) / (source - target)`` on the example means: 1 = the head alone carries the
source behaviour, 0 = no effect. :func:`patch_heads_reference` is the exact one-forward-per-index reference.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np
import torch

from mechcliff.chat import EncodedBatch
from mechcliff.errors import MechcliffError
from mechcliff.head_scores import PerHeadScores
from mechcliff.model.capture import act_name, forward, layer_of
from mechcliff.results import Result

if TYPE_CHECKING:
    from mechcliff.model.handle import ModelHandle


def _token_id(value: Any, who: str) -> int:
    if isinstance(value, (int, np.integer)) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        return int(value)
    raise MechcliffError(f"{who} takes token ids (ints), not {value!r}: "
                         "use tokenizer.encode(text, add_special_tokens=False)[0]")


class ProbeMetric:
    """The probe's logit ``w · resid_post[layer] + b`` at one position per example."""

    name = "probe_logit"

    def __init__(self, probe: Any):
        lacking = [a for a in ("w", "b", "layer", "hook_name") if not hasattr(probe, a)]
        if lacking:
            raise MechcliffError(f"ProbeMetric needs a probe (mechcliff.LinearProbe, e.g. from mc.fit_probe), not a "
                                 f"{type(probe).__name__} (it has no {', '.join(lacking)})")
        self.probe = probe

    def stop_at_layer(self, handle: ModelHandle) -> int | None:
        return self.probe.layer + 1

    def hooks(self, positions: torch.Tensor, store: dict[str, torch.Tensor]) -> list[tuple[str, Any]]:
        w = torch.as_tensor(self.probe.w, dtype=torch.float32)

        def read(x: torch.Tensor, hook: Any) -> None:
            rows = torch.arange(x.shape[0])
            store["metric"] = (x[rows, positions].float() @ w.to(x.device) + self.probe.b).double().cpu()

        return [(self.probe.hook_name, read)]

    def from_logits(self, logits: torch.Tensor, positions: torch.Tensor, store: dict[str, torch.Tensor]) -> torch.Tensor:
        return store["metric"]


class LogitDiffMetric:
    """``logit[a] - logit[b]`` of the next-token distribution at one position per example."""

    name = "logit_diff"

    def __init__(self, token_a: int, token_b: int):
        self.a, self.b = _token_id(token_a, "LogitDiffMetric"), _token_id(token_b, "LogitDiffMetric")

    def stop_at_layer(self, handle: ModelHandle) -> int | None:
        return None

    def hooks(self, positions: torch.Tensor, store: dict[str, torch.Tensor]) -> list[tuple[str, Any]]:
        return []

    def from_logits(self, logits: torch.Tensor, positions: torch.Tensor, store: dict[str, torch.Tensor]) -> torch.Tensor:
        row = logits[torch.arange(logits.shape[0]), positions].double().cpu()
        return row[:, self.a] - row[:, self.b]


class RefusalLogOddsMetric:
    """Arditi et al. (arXiv 2406.11717): ``log P(refusal first tokens) - log P(other tokens)`` at a position."""

    name = "refusal_log_odds"

    def __init__(self, refusal_token_ids: Sequence[int]):
        given = [] if isinstance(refusal_token_ids, (str, int)) else list(refusal_token_ids)
        if not given:
            raise MechcliffError("RefusalLogOddsMetric needs a non-empty list of refusal token ids, e.g. "
                                 "[tokenizer.encode(w, add_special_tokens=False)[0] for w in ('I', 'Sorry')]")
        ids = sorted(set(_token_id(i, "RefusalLogOddsMetric") for i in given))
        self.ids = torch.tensor(ids, dtype=torch.long)

    def stop_at_layer(self, handle: ModelHandle) -> int | None:
        return None

    def hooks(self, positions: torch.Tensor, store: dict[str, torch.Tensor]) -> list[tuple[str, Any]]:
        return []

    def from_logits(self, logits: torch.Tensor, positions: torch.Tensor, store: dict[str, torch.Tensor]) -> torch.Tensor:
        lp = torch.log_softmax(logits[torch.arange(logits.shape[0]), positions].double(), -1).cpu()
        p_ref = torch.logsumexp(lp[:, self.ids], -1)
        return p_ref - torch.log1p(-p_ref.exp().clamp(max=1 - 1e-12))


METRICS = (ProbeMetric, LogitDiffMetric, RefusalLogOddsMetric)
#: Metric names users type -> how to build that metric (every metric needs an argument, so none is built by name).
_METRIC_NAMES = {
    "probe": "ProbeMetric(probe)", "probe_logit": "ProbeMetric(probe)",
    "logit_diff": "LogitDiffMetric(token_a, token_b)", "logitdiff": "LogitDiffMetric(token_a, token_b)",
    "refusal_log_odds": "RefusalLogOddsMetric(refusal_token_ids)",
    "refusal": "RefusalLogOddsMetric(refusal_token_ids)", "log_odds": "RefusalLogOddsMetric(refusal_token_ids)",
}
_NEEDS = {"ProbeMetric": "a probe", "LogitDiffMetric": "two token ids", "RefusalLogOddsMetric": "refusal token ids"}
_INTERFACE = ("name", "stop_at_layer", "hooks", "from_logits")
_METRIC_LIST = ("ProbeMetric(probe), LogitDiffMetric(token_a, token_b) or RefusalLogOddsMetric(refusal_token_ids) "
                "(from mechcliff.patching, or mechcliff.ProbeMetric, ...)")


def resolve_metric(metric: Any) -> Any:
    """``metric`` checked for the metric interface (``name``, ``stop_at_layer(handle)``, ``hooks(positions, store)``,
    ``from_logits(logits, positions, store)``), with a clear :class:`MechcliffError` otherwise.

    A :class:`~mechcliff.probe.LinearProbe` is accepted and wrapped in :class:`ProbeMetric`. A metric *name*
    (``"probe"``, ``"logit_diff"``, ``"refusal_log_odds"``) cannot be built without its argument: the error
    says which constructor to call; any other string lists the metric classes.
    """
    from mechcliff.probe import LinearProbe

    if isinstance(metric, LinearProbe):
        return ProbeMetric(metric)
    if isinstance(metric, str):
        key = metric.strip().lower().replace("-", "_").replace(" ", "_")
        if key in _METRIC_NAMES:
            ctor = _METRIC_NAMES[key]
            raise MechcliffError(f"metric {metric!r} needs {_NEEDS[ctor.split('(')[0]]}: pass {ctor} "
                                 "(mechcliff.patching) instead of the name")
        raise MechcliffError(f"unknown metric {metric!r}: pass a metric object, one of {_METRIC_LIST}")
    if isinstance(metric, type):
        example = next((c for c in _METRIC_NAMES.values() if c.startswith(metric.__name__ + "(")), None)
        hint = f"pass an instance, e.g. {example}" if example else f"pass an instance of a metric, one of {_METRIC_LIST}"
        raise MechcliffError(f"metric {metric.__name__} is a class: {hint}")
    lacking = [a for a in _INTERFACE if not hasattr(metric, a) or (a != "name" and not callable(getattr(metric, a)))]
    if lacking:
        raise MechcliffError(f"metric {type(metric).__name__} has no {', '.join(lacking)} (a metric needs name, "
                             "stop_at_layer(handle), hooks(positions, store) and from_logits(logits, positions, "
                             f"store)): pass one of {_METRIC_LIST}")
    return metric


@dataclasses.dataclass
class PatchingResult(PerHeadScores, Result):
    """Metric after patching each head, with the unpatched target and source baselines."""

    KIND: ClassVar[str] = "head_patching"
    per_example: np.ndarray  # [example, layer, head] metric after patching (NaN where not patched)
    target: np.ndarray  # [example] metric of the unpatched target run
    source: np.ndarray  # [example] metric of the source run
    metric: str
    model_id: str = ""

    @property
    def normalized(self) -> np.ndarray:
        """``(patched - target) / (source - target)`` on example means, ``[layer, head]``."""
        denom = float(self.source.mean() - self.target.mean())
        if abs(denom) < 1e-12:
            return np.full_like(self.mean, np.nan)
        return (self.mean - self.target.mean()) / denom

    def head_scores(self) -> np.ndarray:
        """Heads rank by normalized effect (largest first)."""
        return self.normalized

    def plot(self, highlight: list[tuple[int, int]] | None = None):
        from mechcliff.plotting import layer_head_heatmap

        return layer_head_heatmap(self.normalized, title=f"Activation patching ({self.metric}, normalised)",
                                  colorbar_title="(patched − target) / (source − target)", highlight=highlight)

    def summary_rows(self) -> list[tuple[str, str]]:
        return [("examples", str(self.per_example.shape[0])), ("metric", self.metric),
                ("target / source", f"{self.target.mean():.3f} / {self.source.mean():.3f}"),
                ("top heads", ", ".join(self.top(5)))]


def rows_for_budget(handle: ModelHandle, batch: EncodedBatch, memory_budget_mb: float, recomputed_tokens: int | None = None) -> int:
    """How many rows (examples × patch indices) one forward may hold within ``memory_budget_mb``.

    Per row we count, in the model's dtype (2 bytes in bfloat16 / float16, 4 in float32): the KV cache of the
    prefix (keys and values of every layer), the activations of the recomputed tokens (residual-sized tensors,
    about 8 per layer), and the attention scores of the recomputed tokens against the whole sequence; the logits of
    the recomputed tokens in float32 (they are upcast). A deliberate over-estimate: the budget is a ceiling, not a
    target.
    """
    cfg = handle.bridge.cfg
    T = int(batch.tokens.shape[1])
    q = T if recomputed_tokens is None else int(recomputed_tokens)
    kv_heads = int(getattr(cfg, "n_key_value_heads", None) or handle.n_heads)
    per_layer = 2 * T * kv_heads * handle.d_head + 8 * q * handle.d_model + handle.n_heads * q * T
    size = torch.empty((), dtype=handle.dtype).element_size()
    per_row_bytes = size * handle.n_layers * per_layer + 4 * q * int(handle.hf_model.config.vocab_size)
    return max(1, int(memory_budget_mb * 2**20 // per_row_bytes))


def _check_pair(handle: ModelHandle, target: EncodedBatch, source: EncodedBatch, target_position: Any, source_position: Any):
    if len(target) != len(source):
        raise MechcliffError(f"source ({len(source)}) and target ({len(target)}) must be paired example by example")
    tpos = target.require(target_position, "the patch position")
    spos = source.require(source_position, "the patch position")
    return tpos, spos


@torch.no_grad()
def _source_z(handle: ModelHandle, source: EncodedBatch, spos: torch.Tensor) -> torch.Tensor:
    """``z`` of every head at the source positions: ``[example, layer, head, d_head]`` (the whole model; the
    references use it)."""
    store: dict[int, torch.Tensor] = {}
    rows = torch.arange(len(source))

    def grab(z: torch.Tensor, hook: Any) -> None:
        store[layer_of(hook.name)] = z[rows, spos].detach().clone()

    forward(handle, source.tokens, source.attention_mask, hooks=[(act_name("z", l), grab) for l in range(handle.n_layers)])
    return torch.stack([store[l] for l in range(handle.n_layers)], 1)


@torch.no_grad()
def _source_run(handle: ModelHandle, source: EncodedBatch, spos: torch.Tensor, metric: Any,
                layers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of the source batch: ``z`` of every head of ``layers`` at the source positions
    (``[example, layer, head, d_head]``, zeros in the other layers) and the metric there."""
    store: dict[int, torch.Tensor] = {}
    rows = torch.arange(len(source))

    def grab(z: torch.Tensor, hook: Any) -> None:
        store[layer_of(hook.name)] = z[rows, spos.to(z.device)].detach().clone()

    metric_store: dict[str, torch.Tensor] = {}
    hooks = [(act_name("z", l), grab) for l in layers] + metric.hooks(spos, metric_store)
    stop = metric.stop_at_layer(handle)
    logits = forward(handle, source.tokens, source.attention_mask, hooks=hooks, stop_at_layer=stop,
                     return_type=None if stop is not None else "logits")
    value = metric.from_logits(logits, spos, metric_store)
    z = torch.zeros(len(source), handle.n_layers, handle.n_heads, handle.d_head, dtype=handle.dtype)
    for l in layers:
        z[:, l] = store[l].cpu()
    return z, value


@torch.no_grad()
def _run_metric(handle: ModelHandle, metric: Any, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                extra_hooks: list, start_at_layer: int | None = None) -> torch.Tensor:
    store: dict[str, torch.Tensor] = {}
    hooks = extra_hooks + metric.hooks(positions, store)
    stop = metric.stop_at_layer(handle)
    logits = forward(handle, tokens, mask, hooks=hooks, start_at_layer=start_at_layer, stop_at_layer=stop,
                     return_type=None if stop is not None else "logits")
    return metric.from_logits(logits, positions, store)


def _parse_heads(handle: ModelHandle, heads: Sequence[Any] | None, metric: Any) -> list[tuple[int, int]]:
    """Heads to patch; heads after the metric's last layer (e.g. the probe layer) cannot affect it and stay NaN."""
    from mechcliff.interventions import validate

    parsed = ([(l, h) for l in range(handle.n_layers) for h in range(handle.n_heads)] if heads is None
              else validate(handle, heads, "scale_z", 0.0))
    stop = metric.stop_at_layer(handle)
    return [(l, h) for l, h in parsed if stop is None or l < stop]


@torch.no_grad()
def patch_heads(
    handle: ModelHandle, target: EncodedBatch, source: EncodedBatch, metric: Any, *, heads: Sequence[Any] | None = None,
    target_position: Any = "think_end", source_position: Any = "think_end", max_rows: int | None = None,
    memory_budget_mb: float = 2048.0, progress: bool = False,
) -> PatchingResult:
    """Patch each head's ``z`` from ``source`` into ``target`` (see module docstring); batched and prefix-reusing.

    When every target position is past the first token, the shared prefix (all tokens before the earliest patch
    position) is run once with a KV cache, and each chunk of patch indices only recomputes the suffix: for a
    patch at ``think_end`` of a batch encoded without answers that is a single token per row. Otherwise chunks
    start at the patched layer from the cached ``resid_pre``. Chunks hold at most ``max_rows`` rows (examples ×
    patch indices); by default that is derived from ``memory_budget_mb`` (:func:`rows_for_budget`).

    Args:
        handle: the loaded model (:func:`mechcliff.load_model`).
        target: the batch that is patched (e.g. jailbreak rollouts that comply).
        source: the batch the patched values come from, paired example by example with ``target`` (same length).
        metric: what is read after patching: a :class:`ProbeMetric`, :class:`LogitDiffMetric` or
            :class:`RefusalLogOddsMetric` (any object with their interface), or a probe (wrapped in
            :class:`ProbeMetric`); see :func:`resolve_metric`.
        heads: the heads to patch (``"L2H3"`` or ``(layer, head)``); default every head (before the probe layer,
            for probe metrics).
        target_position: where ``z`` is replaced in each target example (an anchor such as ``"think_end"``, an
            int, or a per-example index tensor); the metric is read there too.
        source_position: where ``z`` is read in each source example (same forms).
        max_rows: the most rows (examples × patch indices) in one forward; default from ``memory_budget_mb``.
        memory_budget_mb: the memory one forward may use, when ``max_rows`` is not given.
        progress: show a progress bar.
    """
    metric = resolve_metric(metric)
    tpos, spos = _check_pair(handle, target, source, target_position, source_position)
    todo = _parse_heads(handle, heads, metric)
    B = len(target)
    if max_rows is None:  # chunk by the memory budget
        suffix = int(target.tokens.shape[1] - tpos.min()) if int(tpos.min()) > 0 else None
        max_rows = max(B, rows_for_budget(handle, target, memory_budget_mb, suffix))
    if max_rows < B:
        raise MechcliffError(f"max_rows ({max_rows}) must be at least the number of examples ({B})")
    src_z, source_metric = _source_run(handle, source, spos, metric, sorted({l for l, _ in todo}))
    out = np.full((B, handle.n_layers, handle.n_heads), np.nan)
    if int(tpos.min()) > 0:
        target_metric = _patch_suffix(handle, target, tpos, src_z, metric, todo, max_rows, out, progress)
    else:
        target_metric = _patch_from_layer(handle, target, tpos, src_z, metric, todo, max_rows, out, progress)
    return PatchingResult(per_example=out, target=target_metric.numpy(), source=source_metric.numpy(),
                          metric=metric.name, model_id=handle.model_id)


def _prefix_cache(handle: ModelHandle, target: EncodedBatch, P: int) -> Any:
    """KV cache of the target's first ``P`` tokens (``None`` when ``P == 0``)."""
    if P == 0:
        return None
    _, cache = forward(handle, target.tokens[:, :P], target.attention_mask[:, :P], return_type="logits_and_cache")
    return cache


@torch.no_grad()
def _target_run(handle: ModelHandle, target: EncodedBatch, tpos: torch.Tensor, metric: Any, P: int
                ) -> tuple[torch.Tensor, Any]:
    """The unpatched metric at the target positions and the KV cache of the target's first ``P`` tokens (``None``
    when ``P == 0``), from one forward of the whole batch: its cache cropped to ``P`` (keys and values before ``P``
    depend only on the tokens before ``P``). A cache whose layers are not all plain (sliding-window layers keep only
    their window, so cropping would lose keys) is computed by a second forward of the prefix instead."""
    store: dict[str, torch.Tensor] = {}
    hooks = metric.hooks(tpos, store)
    if P == 0:
        return _run_metric(handle, metric, target.tokens, target.attention_mask, tpos, []), None
    logits, cache = forward(handle, target.tokens, target.attention_mask, hooks=hooks, return_type="logits_and_cache")
    value = metric.from_logits(logits, tpos, store)
    remove = int(target.tokens.shape[1]) - P
    if all(type(layer).__name__ == "DynamicLayer" for layer in getattr(cache, "layers", [None])):
        if remove:
            cache.crop(-remove)  # transformers 5: a negative count of tokens to remove from the end
        return value, cache
    return value, _prefix_cache(handle, target, P)


def _rows_of_layer(chunk: Sequence[tuple[int, int]], B: int, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In a chunk replicated as rows ``example * K + replica``, the rows whose index ``(layer, i)`` patches ``layer``:
    returns those rows, their examples, and their second index ``i`` (a head or an offset)."""
    K = len(chunk)
    ex = torch.arange(B).repeat_interleave(K)
    rep = torch.arange(K).repeat(B)
    rows = torch.tensor([chunk[k][0] == layer for k in range(K)])[rep].nonzero().flatten()
    return rows, ex[rows], torch.tensor([chunk[k][1] for k in range(K)])[rep[rows]]


def _suffix_forward(handle: ModelHandle, target: EncodedBatch, P: int, prefix_cache: Any, K: int, hooks: list,
                    metric: Any, local_pos: torch.Tensor) -> torch.Tensor:
    """Run tokens ``P:`` of ``target`` replicated ``K`` times (row = example * K + replica) on a copy of the
    prefix KV cache (none when ``P == 0``) with ``hooks``; return the metric as ``[example, replica]``."""
    import copy

    kw: dict[str, Any] = {}
    if prefix_cache is not None:
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(K)
        kw["past_key_values"] = cache
    store: dict[str, torch.Tensor] = {}
    pos = local_pos.repeat_interleave(K)
    logits = forward(handle, target.tokens[:, P:].repeat_interleave(K, 0), target.attention_mask.repeat_interleave(K, 0),
                     hooks=hooks + metric.hooks(pos, store), **kw)
    return metric.from_logits(logits, pos, store).reshape(len(target), K)


def _patch_suffix(handle: ModelHandle, target: EncodedBatch, tpos: torch.Tensor, src_z: torch.Tensor, metric: Any,
                  todo: list[tuple[int, int]], max_rows: int, out: np.ndarray, progress: bool) -> torch.Tensor:
    """KV-cache the prefix before the earliest patch position once; recompute only the suffix per chunk."""
    from tqdm.auto import tqdm

    B, P = len(target), int(tpos.min())
    target_metric, prefix_cache = _target_run(handle, target, tpos, metric, P)
    local = tpos - P
    per_forward = max(1, max_rows // B)
    chunks = [todo[i:i + per_forward] for i in range(0, len(todo), per_forward)]
    for chunk in tqdm(chunks, desc="patching", disable=not progress, leave=False):
        K = len(chunk)
        hooks = []
        for l in sorted({l for l, _ in chunk}):
            rows, ex, hs = _rows_of_layer(chunk, B, l)
            vals, where = src_z[ex, l, hs], local[ex]

            def patch_hook(z: torch.Tensor, hook: Any, rows=rows, hs=hs, vals=vals, where=where) -> torch.Tensor:
                z = z.clone()
                z[rows, where, hs] = vals.to(z.dtype)
                return z

            hooks.append((act_name("z", l), patch_hook))
        vals_out = _suffix_forward(handle, target, P, prefix_cache, K, hooks, metric, local)
        for k, (l, h) in enumerate(chunk):
            out[:, l, h] = vals_out[:, k].numpy()
    return target_metric


def _patch_from_layer(handle: ModelHandle, target: EncodedBatch, tpos: torch.Tensor, src_z: torch.Tensor, metric: Any,
                      todo: list[tuple[int, int]], max_rows: int, out: np.ndarray, progress: bool) -> torch.Tensor:
    """Chunks of heads of one layer, each starting at that layer from the target's cached ``resid_pre``."""
    from tqdm.auto import tqdm

    B = len(target)
    store: dict[int, torch.Tensor] = {}

    def keep(x: torch.Tensor, hook: Any) -> None:
        store[layer_of(hook.name)] = x.detach().clone()

    layers = sorted({l for l, _ in todo})
    target_metric = _run_metric(handle, metric, target.tokens, target.attention_mask, tpos,
                                [(act_name("resid_pre", l), keep) for l in layers])
    per_forward = max(1, max_rows // B)
    chunks = []
    for l in layers:
        hs = [h for ll, h in todo if ll == l]
        chunks += [(l, hs[i:i + per_forward]) for i in range(0, len(hs), per_forward)]
    for l, hs in tqdm(chunks, desc="patching", disable=not progress, leave=False):
        K = len(hs)
        x = store[l].repeat(K, 1, 1)
        mask = target.attention_mask.repeat(K, 1)
        pos = tpos.repeat(K)
        rows = torch.arange(K * B)
        head_of_row = torch.tensor(hs).repeat_interleave(B)
        patch = src_z[:, l][torch.arange(B).repeat(K), head_of_row]  # [K*B, d_head]

        def patch_hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
            z = z.clone()
            z[rows, pos, head_of_row] = patch.to(z.dtype)
            return z

        vals = _run_metric(handle, metric, x, mask, pos, [(act_name("z", l), patch_hook)], start_at_layer=l)
        out[:, l, hs] = vals.reshape(K, B).T.numpy()
    return target_metric


@torch.no_grad()
def patch_heads_reference(
    handle: ModelHandle, target: EncodedBatch, source: EncodedBatch, metric: Any, *, heads: Sequence[Any] | None = None,
    target_position: Any = "think_end", source_position: Any = "think_end",
) -> PatchingResult:
    """The exact reference: one full forward per head, no batching of indices and no prefix reuse."""
    metric = resolve_metric(metric)
    tpos, spos = _check_pair(handle, target, source, target_position, source_position)
    B = len(target)
    src_z = _source_z(handle, source, spos)
    out = np.full((B, handle.n_layers, handle.n_heads), np.nan)
    rows = torch.arange(B)
    for l, h in _parse_heads(handle, heads, metric):
        def patch_hook(z: torch.Tensor, hook: Any, h: int = h, l: int = l) -> torch.Tensor:
            z = z.clone()
            z[rows, tpos, h] = src_z[:, l, h].to(z.dtype)
            return z

        out[:, l, h] = _run_metric(handle, metric, target.tokens, target.attention_mask, tpos,
                                   [(act_name("z", l), patch_hook)]).numpy()
    return PatchingResult(
        per_example=out,
        target=_run_metric(handle, metric, target.tokens, target.attention_mask, tpos, []).numpy(),
        source=_run_metric(handle, metric, source.tokens, source.attention_mask, spos, []).numpy(),
        metric=metric.name, model_id=handle.model_id,
    )


def attribution_patch_heads(
    handle: ModelHandle, target: EncodedBatch, source: EncodedBatch, metric: Any, *, target_position: Any = "think_end",
    source_position: Any = "think_end",
) -> PatchingResult:
    """Attribution patching (gradient approximation, Nanda 2023; Syed et al. 2023): one forward and one backward.

    ``patched[l, h] ≈ M(target) + (z_source[l, h] - z_target[l, h]) · ∂M/∂z[l, h]`` at the patch position, for
    every head at once. A fast screen: compare with :func:`patch_heads` via :func:`rank_correlation`.
    """
    metric = resolve_metric(metric)
    tpos, spos = _check_pair(handle, target, source, target_position, source_position)
    B, L = len(target), handle.n_layers
    stop = metric.stop_at_layer(handle)
    layers = range(L if stop is None else stop)
    src_z, source_metric = _source_run(handle, source, spos, metric, layers)
    zs: dict[int, torch.Tensor] = {}

    def keep(z: torch.Tensor, hook: Any) -> torch.Tensor:
        zs[layer_of(hook.name)] = z
        return z

    with torch.enable_grad():
        store: dict[str, torch.Tensor] = {}
        hooks = [(act_name("z", l), keep) for l in layers] + metric.hooks(tpos, store)
        logits = forward(handle, target.tokens, target.attention_mask, hooks=hooks, stop_at_layer=stop,
                         return_type=None if stop is not None else "logits")
        values = metric.from_logits(logits, tpos, store)
        grads = torch.autograd.grad(values.sum(), [zs[l] for l in layers])
    rows = torch.arange(B)
    out = np.full((B, L, handle.n_heads), np.nan)
    for l, g in zip(layers, grads):
        delta = src_z[:, l].double() - zs[l][rows, tpos].detach().double()
        out[:, l] = (values.detach()[:, None] + (delta * g[rows, tpos].double()).sum(-1)).numpy()
    return PatchingResult(per_example=out, target=values.detach().numpy(), source=source_metric.numpy(),
                          metric=metric.name + " (attribution patching)", model_id=handle.model_id)


def rank_correlation(a: PatchingResult, b: PatchingResult) -> float:
    """Spearman rank correlation of two patching results' mean effects over the heads both define."""
    from scipy.stats import spearmanr

    x, y = a.mean.ravel(), b.mean.ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        raise MechcliffError("rank correlation needs at least 3 heads defined in both results")
    return float(spearmanr(x[ok], y[ok]).statistic)


SITES = ("resid_pre", "attn_out", "mlp_out")  # the sites patch_positions patches (mechcliff.model.capture names)


@dataclasses.dataclass
class PositionPatchingResult(Result):
    """Metric after patching one site (``resid_pre``, ``attn_out`` or ``mlp_out``) at one layer and one offset."""

    KIND: ClassVar[str] = "position_patching"
    per_example: np.ndarray  # [example, layer, offset]
    target: np.ndarray
    source: np.ndarray
    offsets: list[int]
    site: str
    metric: str
    model_id: str = ""

    @property
    def normalized(self) -> np.ndarray:
        denom = float(self.source.mean() - self.target.mean())
        m = self.per_example.mean(0)
        return np.full_like(m, np.nan) if abs(denom) < 1e-12 else (m - self.target.mean()) / denom

    def plot(self):
        import plotly.graph_objects as go

        from mechcliff.plotting import DIVERGING_SCALE, TEMPLATE

        z = self.normalized
        m = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
        fig = go.Figure(go.Heatmap(z=z, x=[str(o) for o in self.offsets], y=list(range(z.shape[0])),
                                   colorscale=DIVERGING_SCALE, zmin=-m, zmax=m, zmid=0,
                                   colorbar=dict(title="normalised effect"),
                                   hovertemplate="layer %{y}, offset %{x}: %{z:.3f}<extra></extra>"))
        fig.update_layout(template=TEMPLATE, title=f"Patching {self.site} ({self.metric}, normalised)",
                          xaxis_title="position relative to the patch anchor", yaxis_title="layer")
        fig.update_yaxes(autorange="reversed")
        return fig


@torch.no_grad()
def patch_positions(
    handle: ModelHandle, target: EncodedBatch, source: EncodedBatch, metric: Any, *, site: str = "resid_pre",
    offsets: Sequence[int] = (-4, -3, -2, -1, 0), target_anchor: Any = "think_end", source_anchor: Any = "think_end",
    metric_position: Any = "think_end", layers: Sequence[int] | None = None, max_rows: int | None = None,
    memory_budget_mb: float = 2048.0,
) -> PositionPatchingResult:
    """A ``[layer, offset]`` grid: patch ``site`` of layer ``l`` at ``anchor + offset`` (per example, in both runs)
    from source into target, one index per replica, recomputing only the suffix after the earliest patched token."""
    metric = resolve_metric(metric)
    if site not in SITES:
        raise MechcliffError(f"site must be one of {', '.join(SITES)}, not {site!r}")
    B = len(target)
    if len(source) != B:
        raise MechcliffError(f"source ({len(source)}) and target ({B}) must be paired example by example")
    if max_rows is None:
        max_rows = max(B, rows_for_budget(handle, target, memory_budget_mb))
    if max_rows < B:
        raise MechcliffError(f"max_rows ({max_rows}) must be at least the number of examples ({B})")
    ta, sa, mpos = target.position(target_anchor), source.position(source_anchor), target.position(metric_position)
    offs = torch.tensor(list(offsets), dtype=torch.long)
    tp, sp = ta[:, None] + offs, sa[:, None] + offs  # [B, n_offsets]
    lo_t = torch.tensor(target.pad_lengths)[:, None]
    lo_s = torch.tensor(source.pad_lengths)[:, None]
    if (ta < 0).any() or (sa < 0).any() or (tp < lo_t).any() or (sp < lo_s).any() or (tp > mpos[:, None]).any() \
            or (tp >= target.tokens.shape[1]).any() or (sp >= source.tokens.shape[1]).any():
        raise MechcliffError("some anchor + offset falls outside an example (or after the metric position)")
    layer_list = list(range(handle.n_layers)) if layers is None else [handle.check_layer(l) for l in layers]
    stop = metric.stop_at_layer(handle)
    layer_list = [l for l in layer_list if stop is None or l < stop or (site == "resid_pre" and l <= stop)]
    names = [act_name(site, l) for l in layer_list]
    src: dict[int, torch.Tensor] = {}
    rows = torch.arange(B)

    def grab(x: torch.Tensor, hook: Any) -> None:
        src[layer_of(hook.name)] = x[rows[:, None], sp].detach().clone()  # [B, n_offsets, d_model]

    source_metric = _run_metric(handle, metric, source.tokens, source.attention_mask, source.position(metric_position),
                                [(n, grab) for n in names])
    target_metric = _run_metric(handle, metric, target.tokens, target.attention_mask, mpos, [])
    P = int(tp.min())
    out = np.full((B, handle.n_layers, len(offs)), np.nan)
    todo = [(l, j) for l in layer_list for j in range(len(offs))]
    per_forward = max(1, max_rows // B)
    prefix_cache = _prefix_cache(handle, target, P)
    for i in range(0, len(todo), per_forward):
        chunk = todo[i:i + per_forward]
        K = len(chunk)
        hooks = []
        for l in sorted({l for l, _ in chunk}):
            r, ex, offset = _rows_of_layer(chunk, B, l)
            vals, at = src[l][ex, offset], tp[ex, offset] - P

            def patch_hook(x: torch.Tensor, hook: Any, r=r, vals=vals, at=at) -> torch.Tensor:
                x = x.clone()
                x[r, at] = vals.to(x.dtype)
                return x

            hooks.append((act_name(site, l), patch_hook))
        vals_out = _suffix_forward(handle, target, P, prefix_cache, K, hooks, metric, mpos - P)
        for k, (l, j) in enumerate(chunk):
            out[:, l, j] = vals_out[:, k].numpy()
    return PositionPatchingResult(per_example=out, target=target_metric.numpy(), source=source_metric.numpy(),
                                  offsets=[int(o) for o in offs], site=site, metric=metric.name,
                                  model_id=handle.model_id)


@torch.no_grad()
def patch_positions_reference(
    handle: ModelHandle, target: EncodedBatch, source: EncodedBatch, metric: Any, *, site: str = "resid_pre",
    offsets: Sequence[int] = (-4, -3, -2, -1, 0), target_anchor: Any = "think_end", source_anchor: Any = "think_end",
    metric_position: Any = "think_end", layers: Sequence[int] | None = None,
) -> PositionPatchingResult:
    """One full forward per (layer, offset): the exact reference for :func:`patch_positions`."""
    metric = resolve_metric(metric)
    B = len(target)
    ta, sa, mpos = target.position(target_anchor), source.position(source_anchor), target.position(metric_position)
    layer_list = list(range(handle.n_layers)) if layers is None else list(layers)
    stop = metric.stop_at_layer(handle)
    layer_list = [l for l in layer_list if stop is None or l < stop or (site == "resid_pre" and l <= stop)]
    rows = torch.arange(B)
    src: dict[int, torch.Tensor] = {}

    def grab(x: torch.Tensor, hook: Any) -> None:
        src[layer_of(hook.name)] = x.detach().clone()

    source_metric = _run_metric(handle, metric, source.tokens, source.attention_mask, source.position(metric_position),
                                [(act_name(site, l), grab) for l in layer_list])
    out = np.full((B, handle.n_layers, len(offsets)), np.nan)
    for l in layer_list:
        for j, o in enumerate(offsets):
            def patch_hook(x: torch.Tensor, hook: Any, l=l, o=o) -> torch.Tensor:
                x = x.clone()
                x[rows, ta + o] = src[l][rows, sa + o].to(x.dtype)
                return x

            out[:, l, j] = _run_metric(handle, metric, target.tokens, target.attention_mask, mpos,
                                       [(act_name(site, l), patch_hook)]).numpy()
    return PositionPatchingResult(
        per_example=out, target=_run_metric(handle, metric, target.tokens, target.attention_mask, mpos, []).numpy(),
        source=source_metric.numpy(), offsets=[int(o) for o in offsets], site=site, metric=metric.name,
        model_id=handle.model_id)
