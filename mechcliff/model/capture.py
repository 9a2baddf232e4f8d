"""Hook sites and the one batched capture function: every analysis reads activations through here.

* :func:`act_name` names a hook site (``act_name("z", 3)`` → ``"blocks.3.attn.hook_z"``) and :func:`layer_of`
  reads the layer back out of a hook name; nothing else in mechcliff formats or parses hook names.
* :func:`forward` is the one place where a forward pass's inputs are moved to the model's device
  (TransformerLens leaves them where the caller put them). Engines that feed their own inputs (head patching,
  Ships, the Jacobian of one head) call it directly.
* :func:`capture` is the batched capture loop of every analysis: it chunks the examples, moves each chunk's tokens
  and mask to the model's device (through :func:`forward`), gathers per-example positions inside the hook (so
  memory stays ``O(batch × d)`` per site, not ``O(batch × pos × d)``), applies each site's reader on the
  activation's own device, and brings what the readers return back to the CPU. It reads on the plain Hugging Face
  model (:mod:`mechcliff.model.plain`, the model's own sdpa / flash attention) wherever the load-time check
  verified that path gives the bridge's activations, and through the bridge otherwise (attention patterns,
  queries, logits).

Readers are ``reader(activation, where) -> tensor``: ``activation`` is the hook's tensor, already gathered at
``where.positions`` when ``at`` is given (``[rows, ...]``; attention patterns are gathered on their query axis), and
``where`` says which examples of the batch the rows are (:class:`Where`). Exact reductions are the reader's to
upcast (``x.float() @ w``, ``.double()``): the capture never changes a dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, overload

import torch
from jaxtyping import Int

from mechcliff.errors import MechcliffError
from mechcliff.model.sites import _QUERY_AXIS_SITES, GLOBAL_SITES, SITES, act_name, layer_of

__all__ = ["GLOBAL_SITES", "MAX_TOKENS", "SITES", "Chunk", "Where", "act_name", "capture", "forward", "layer_of",
           "to_device"]

if TYPE_CHECKING:
    from mechcliff.model.handle import ModelHandle

#: The default memory budget of one forward pass of an analysis, in tokens (rows × the chunk's longest row): 16 rows
#: of 1,024 tokens, or 4 of 4,096. The bridge's attention holds ``heads × T²`` scores per row and layer, so a budget in
#: rows alone (``batch_size``) would run 16 rows of 4,096 tokens at once.
MAX_TOKENS = 16_384


@overload
def to_device(handle: ModelHandle, t: torch.Tensor) -> torch.Tensor: ...
@overload
def to_device(handle: ModelHandle, t: None) -> None: ...
def to_device(handle: ModelHandle, t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` on the device of the model's inputs (its embedding); a no-op when it is there already."""
    if t is None:
        return None
    device = handle.device
    return t if t.device == device else t.to(device)


def forward(
    handle: ModelHandle, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
    hooks: Sequence[tuple[str, Callable[..., Any]]] = (), start_at_layer: int | None = None,
    stop_at_layer: int | None = None, return_type: str | None = "logits", **kwargs: Any,
) -> Any:
    """One forward pass of ``handle``'s bridge with ``hooks``; inputs and mask moved to the model's device here.

    ``inputs``: token ids ``[batch, pos]``, or the residual stream ``[batch, pos, d_model]`` with
    ``start_at_layer``. Returns the bridge's output (logits, or ``None`` with ``return_type=None``). Further
    keyword arguments (``past_key_values``) go to the bridge as they are.
    """
    kw: dict[str, Any] = dict(kwargs)
    if start_at_layer is not None:
        kw["start_at_layer"] = start_at_layer
    if stop_at_layer is not None:
        kw["stop_at_layer"] = stop_at_layer
    if return_type != "logits":
        kw["return_type"] = return_type
    return handle.bridge.run_with_hooks(to_device(handle, inputs), attention_mask=to_device(handle, attention_mask),
                                        fwd_hooks=list(hooks), **kw)


class TokenBatch(Protocol):
    """What :func:`capture` needs of a batch (:class:`mechcliff.chat.EncodedBatch` has it; ``position`` only when
    ``at`` is an anchor rather than a tensor of positions)."""

    tokens: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class Where:
    """Which examples a chunk's rows are, handed to every reader.

    ``index``: the rows' indices in the whole batch (CPU); ``positions``: their gathered positions (padded
    coordinates, CPU) when :func:`capture` was given ``at``; ``attention_mask``: the chunk's mask (CPU, all rows
    of the forward, not only the gathered ones); ``offset``: with ``pack=True`` the chunk runs without the left
    padding all its rows share, so column ``c`` of its activations is column ``c + offset`` of the batch."""

    index: Int[torch.Tensor, " rows"]
    positions: Int[torch.Tensor, " rows"] | None
    attention_mask: torch.Tensor
    offset: int = 0  # the batch column of the chunk's column 0 (left padding common to the chunk is cut off)

    def mask_on(self, x: torch.Tensor) -> torch.Tensor:
        """The chunk's attention mask as booleans on ``x``'s device."""
        return self.attention_mask.to(x.device).bool()


@dataclasses.dataclass
class Chunk:
    """One chunk of a capture: ``values[hook_name]`` is what that site's reader returned (CPU), for the rows
    ``where.index`` of the batch; ``logits`` the chunk's output when asked for (on the model's device)."""

    where: Where
    values: dict[str, torch.Tensor]
    logits: torch.Tensor | None = None


Reader = Callable[[torch.Tensor, Where], torch.Tensor]


def _keep(x: torch.Tensor, where: Where) -> torch.Tensor:
    return x


def _gather(x: torch.Tensor, name: str, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x`` at one position per row (rows: indices into the chunk; attention patterns on their query axis)."""
    r, p = rows.to(x.device), positions.to(x.device)
    return x[r, :, p] if name.endswith(_QUERY_AXIS_SITES) else x[r, p]


def _to_cpu(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    out = out.detach()
    if out.device.type == "cpu" and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        return out.clone()  # never hand back a view of the model's own activation
    return out.cpu()


class _AllRead(Exception):
    """Raised by the last reader of a forward: everything asked for is read, the rest (the unembedding) is skipped."""


def _lengths(mask: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.long).sum(1).cpu()


def _plan(order: torch.Tensor, lengths: torch.Tensor, batch_size: int, max_tokens: int | None, pack: bool
          ) -> list[torch.Tensor]:
    """Chunks of ``order``: at most ``batch_size`` rows and, with ``max_tokens``, at most that many padded tokens
    (rows × the chunk's longest row; a row longer than the budget runs alone). ``pack`` sorts rows by length first
    (stable), so that a chunk pays for its own longest row, not the batch's."""
    if pack:
        order = order[torch.sort(lengths[order], stable=True).indices]
    chunks: list[torch.Tensor] = []
    start = 0
    while start < len(order):
        end, longest = start, 0
        while end < len(order) and end - start < batch_size:
            longest_next = max(longest, int(lengths[order[end]]))
            if max_tokens is not None and end > start and (end - start + 1) * longest_next > max_tokens:
                break
            longest, end = longest_next, end + 1
        chunks.append(order[start:end])
        start = end
    return chunks


def _auto_stop(names: Sequence[str]) -> int | None:
    try:
        return max(layer_of(n) for n in names) + 1
    except MechcliffError:  # a site outside the blocks (ln_final): run every layer
        return None


PATHS = ("auto", "bridge", "plain")


def _choose_path(handle: ModelHandle, path: str, names: list[str], hooks: Sequence[tuple[str, Any]],
                 return_logits: bool, stop: bool = False) -> bool:
    """True when the capture reads through the plain HF model (see :func:`capture`'s ``path``); ``stop``: the
    caller gave an explicit ``stop_at_layer`` (the bridge's)."""
    if path not in PATHS:
        raise MechcliffError(f"path must be one of {', '.join(PATHS)}, not {path!r}")
    if path == "bridge":
        return False
    from mechcliff.model.plain import unservable_hooks, verified_sites

    sites = verified_sites(handle)
    unverified = [n for n in names if n not in sites]
    bridge_only = [n for n, _ in hooks if n not in sites] + unservable_hooks(handle)
    if path == "plain" and (unverified or bridge_only or return_logits or stop):
        why = (f"interventions on {', '.join(bridge_only[:3])} run on the bridge only" if bridge_only
               else "logits come from the bridge" if return_logits
               else "stop_at_layer is the bridge's" if stop else f"{', '.join(unverified[:3])} not verified on the "
                    f"plain path of {handle.model_id} (see the conformance check plain_reads)")
        raise MechcliffError(f"path='plain' cannot serve this capture: {why}")
    return not unverified and not bridge_only and not return_logits and not stop


def _plain_hook(hook: Callable[..., None]) -> Callable[[torch.Tensor], None]:
    return lambda x: hook(x, None)


def capture(
    handle: ModelHandle, batch: TokenBatch, readers: Mapping[str, Reader | None] | Sequence[str], *,
    at: Any = None, rows: Sequence[int] | torch.Tensor | None = None, batch_size: int = 16,
    hooks: Sequence[tuple[str, Callable[..., Any]]] = (), stop_at_layer: int | str | None = "auto",
    return_logits: bool = False, max_tokens: int | None = None, pack: bool = False, path: str = "auto",
) -> Iterator[Chunk]:
    """Run ``batch`` through ``handle`` in chunks and yield what ``readers`` keep of each hook site.

    Args:
        readers: hook name → reader (``None``: keep the activation as it is); or a list of hook names.
        at: per-example positions to gather inside the hook: an anchor of ``batch.position`` (``"think_end"``...), an
            int, or a per-example tensor of padded positions (``-1`` = missing). Rows without a position run in the
            forward but are not gathered; a chunk with none is skipped. ``None``: readers get the whole activation.
        rows: the examples to run, in order (default all), chunked ``batch_size`` at a time.
        max_tokens: a memory budget in tokens: a chunk holds at most this many padded tokens (rows × its longest
            row), so long sequences run in smaller chunks; ``None``: ``batch_size`` alone decides.
        pack: sort the rows by length and cut each chunk's common left padding, so that a chunk pays for its own
            longest row (``Where.offset``); chunks then come in length order: place results by ``where.index``.
        hooks: further forward hooks active during the capture (interventions).
        stop_at_layer: ``"auto"`` stops after the deepest block read (unless ``return_logits``); ``None`` runs the
            whole model. Without ``return_logits`` the forward also ends as soon as every site has been read, so
            the final norm and the unembedding (``[batch, pos, vocab]`` logits) are never computed.
        return_logits: keep each chunk's output logits (``Chunk.logits``, on the model's device).
        path: ``"auto"`` reads through the plain Hugging Face model (:mod:`mechcliff.model.plain`: its own sdpa /
            flash attention, no bridge) when every site read, every site of ``hooks`` and every hook point with a
            hook in force (an ``intervene`` block) is one the load-time check verified there, and there is no
            ``return_logits``; else through the bridge. ``"bridge"`` / ``"plain"`` force a path
            (``"plain"`` raises when it cannot serve the capture).
    """
    readers = {n: None for n in readers} if not isinstance(readers, Mapping) else dict(readers)
    if not readers and not return_logits:
        raise MechcliffError("capture needs at least one hook site to read (or return_logits=True)")
    if int(batch_size) < 1:
        raise MechcliffError(f"batch_size must be at least 1, got {batch_size}")
    order = torch.arange(len(batch)) if rows is None else torch.as_tensor(rows, dtype=torch.long).reshape(-1)
    pos_all = None
    if at is not None:
        if isinstance(at, torch.Tensor) and at.dim() == 1 and len(at) == len(batch):
            pos_all = at.to("cpu", torch.long)
        elif hasattr(batch, "position"):
            pos_all = torch.as_tensor(batch.position(at), dtype=torch.long).cpu()
        else:
            raise MechcliffError(f"at={at!r} names a position, but this batch has no anchors: pass one position per "
                                 f"example ({len(batch)})")
    stop: int | None
    if stop_at_layer == "auto":
        stop = None if return_logits else _auto_stop(list(readers))
    elif stop_at_layer is None or isinstance(stop_at_layer, int):
        stop = stop_at_layer
    else:
        raise MechcliffError(f"stop_at_layer must be 'auto', None or a layer, not {stop_at_layer!r}")
    if max_tokens is not None and int(max_tokens) < 1:
        raise MechcliffError(f"max_tokens must be at least 1 (or None), got {max_tokens}")
    use_plain = _choose_path(handle, path, list(readers), hooks, return_logits, stop_at_layer != "auto")
    lengths = _lengths(batch.attention_mask)
    for idx in _plan(order, lengths, int(batch_size), max_tokens, pack):
        tokens, mask, offset = batch.tokens[idx], batch.attention_mask[idx], 0
        if pack:  # cut the left padding every row of the chunk has (only where it really is padding)
            width = int(lengths[idx].max())
            offset = int(mask.shape[1]) - width
            if offset > 0 and not bool(mask[:, :offset].any()):
                tokens, mask = tokens[:, offset:], mask[:, offset:]
            else:
                offset = 0
        if pos_all is None:
            where = Where(index=idx, positions=None, attention_mask=mask, offset=offset)
            sel = None
        else:
            p = pos_all[idx]
            ok = p >= 0
            if not bool(ok.any()):
                continue
            sel = torch.arange(len(idx))[ok]
            where = Where(index=idx[ok], positions=p[ok], attention_mask=mask, offset=offset)
        store: dict[str, torch.Tensor] = {}
        early = not return_logits

        def make(name: str, reader: Reader | None) -> Callable[..., None]:
            def hook(x: torch.Tensor, hook: Any) -> None:
                act = x
                if sel is not None and where.positions is not None:
                    act = _gather(x, name, sel, where.positions - where.offset)
                store[name] = _to_cpu((reader or _keep)(act, where), x)
                if early and len(store) == len(readers):
                    raise _AllRead

            return hook

        out = None
        try:
            if use_plain:
                from mechcliff.model import plain

                with handle.bridge.hooks(fwd_hooks=list(hooks)):  # the plain forward runs the hook points' hooks
                    plain.run(handle, to_device(handle, tokens), to_device(handle, mask),
                              {n: _plain_hook(make(n, r)) for n, r in readers.items()})
            else:
                out = forward(handle, tokens, mask, hooks=[*hooks, *((n, make(n, r)) for n, r in readers.items())],
                              stop_at_layer=stop, return_type="logits" if return_logits else None)
        except _AllRead:
            pass
        missing = [n for n in readers if n not in store]
        if missing:
            raise MechcliffError(f"hook(s) {', '.join(missing)} did not fire on {handle.model_id}")
        yield Chunk(where=where, values=store, logits=out if return_logits else None)
