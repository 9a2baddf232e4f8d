"""Interventions on attention heads, as a context manager. Weights are never modified.

Modes (each names the paper it matches):

* ``scale_z`` (default): multiply the head's output ``z`` (before ``W_O``) by ``gamma`` at every position.
  ``gamma=0`` is zero-ablation, ``gamma=1`` is exactly a no-op, ``gamma>1`` amplifies (e.g. to *restore* refusal
  by amplifying refusal-promoting heads).
* ``zero``: ``scale_z`` with ``gamma=0`` (takes no other ``gamma``: pass none, or 0).
* ``mean``: replace the head's ``z`` by its mean over a reference set (``mean_z`` from :func:`mean_head_outputs`);
  takes no ``gamma`` at all.
* ``scale_q``: multiply the head's query by ``gamma`` (default 1e-5): "undifferentiated attention" of Ships
  (arXiv 2410.13708): attention becomes uniform over the visible keys.
* ``norm_preserving``: the RefusalCliff code's γ-scaling (arXiv 2510.06036): scale the heads' ``z`` by ``gamma``,
  then rescale the layer's attention output ``Z`` (all heads) back to its norm before scaling. The authors' code
  takes one norm over batch × positions × heads; we take it per example and position (over heads), so that results
  do not depend on batch-mates or padding.

Only the modes in :data:`GAMMA_MODES` take ``gamma``; giving a ``gamma`` a mode would ignore (``zero`` with a
non-zero one, ``mean`` with any) is a :class:`MechcliffError`, never silently dropped.

Usage::

    with intervene(model, [(1, 3), (2, 1)], mode="scale_z", gamma=0.0):
        rollouts = generate_rollouts(model, prompts)
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from mechcliff.errors import MechcliffError
from mechcliff.head_scores import head_label
from mechcliff.model.capture import MAX_TOKENS, act_name, capture

if TYPE_CHECKING:
    from mechcliff.model.handle import ModelHandle

MODES = ("scale_z", "zero", "mean", "scale_q", "norm_preserving")
GAMMA_MODES = ("scale_z", "scale_q", "norm_preserving")
"""The modes that take ``gamma``; ``zero`` is ``gamma=0`` by definition and ``mean`` has no ``gamma``."""
DEFAULT_GAMMA = {"scale_z": 0.0, "zero": 0.0, "mean": 0.0, "scale_q": 1e-5, "norm_preserving": 0.0}
Head = tuple[int, int]


def parse_head(label: "str | Sequence[int]") -> Head:
    """``"L2H3"`` or ``(2, 3)`` -> ``(2, 3)``."""
    if isinstance(label, str):
        s = label.strip().upper()
        if not (s.startswith("L") and "H" in s):
            raise MechcliffError(f"cannot read head {label!r}: write heads as 'L<layer>H<head>', e.g. 'L2H3'")
        layer, head = s[1:].split("H", 1)
        try:
            return int(layer), int(head)
        except ValueError:
            raise MechcliffError(f"cannot read head {label!r}: write heads as 'L<layer>H<head>'") from None
    return int(label[0]), int(label[1])


@dataclass
class HeadIntervention:
    """A named intervention on a set of heads (serialisable)."""

    heads: list[Head]
    mode: str = "scale_z"
    gamma: float = 0.0
    mean_z: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"heads": [head_label(h) for h in self.heads], "mode": self.mode, "gamma": self.gamma}


def check_gamma(mode: str, gamma: float | None) -> float:
    """The ``gamma`` that ``mode`` uses (its default when ``gamma is None``). A ``gamma`` the mode would ignore --
    ``zero`` with anything but 0, ``mean`` with any -- is a :class:`MechcliffError` naming the modes that take one."""
    if mode not in MODES:
        raise MechcliffError(f"unknown intervention mode {mode!r}; use one of {', '.join(MODES)}")
    if gamma is None:
        return DEFAULT_GAMMA[mode]
    if isinstance(gamma, bool):
        raise MechcliffError(f"gamma must be a number, got {gamma!r}")
    try:
        g = float(gamma)
    except (TypeError, ValueError):
        raise MechcliffError(f"gamma must be a number, got {gamma!r}") from None
    if not math.isfinite(g):
        raise MechcliffError(f"gamma must be finite, got {gamma!r}")
    takes = f"only the modes {', '.join(GAMMA_MODES)} take gamma"
    if mode == "zero" and g != 0.0:
        raise MechcliffError(f"mode 'zero' is gamma=0 and takes no other gamma (got gamma={gamma!r}): {takes}; "
                             f"use mode 'scale_z' with gamma={gamma!r}")
    if mode == "mean":
        raise MechcliffError(f"mode 'mean' replaces z by its mean and takes no gamma (got gamma={gamma!r}): {takes}")
    return g


def validate(handle: ModelHandle, heads: Sequence[Any], mode: str, gamma: float | None = None) -> list[Head]:
    """Check ``mode``, its ``gamma`` (:func:`check_gamma`) and ``heads`` against the model; returns parsed heads."""
    check_gamma(mode, gamma)
    out = []
    for h in heads:
        layer, head = parse_head(h)
        if not (0 <= layer < handle.n_layers and 0 <= head < handle.n_heads):
            raise MechcliffError(
                f"head {head_label((layer, head))} does not exist: {handle.model_id} has {handle.n_layers} layers "
                f"x {handle.n_heads} heads"
            )
        out.append((layer, head))
    return out


@contextlib.contextmanager
def intervene(
    handle: ModelHandle, heads: Sequence[Any], *, mode: str = "scale_z", gamma: float | None = None, mean_z: Any = None
) -> Iterator[HeadIntervention]:
    """Apply ``mode`` to ``heads`` for the duration of the ``with`` block (forward passes and generation).

    What ``gamma`` (γ) means in each mode (``gamma=None`` is the mode's default, :data:`DEFAULT_GAMMA`):

    * ``scale_z``: the factor on the head's output ``z``: 0 (default) ablates, 1 is a no-op, > 1 amplifies.
    * ``zero``: ``scale_z`` with γ = 0; takes no other γ (pass none, or 0).
    * ``mean``: takes no γ at all; ``z`` is replaced by ``mean_z``.
    * ``scale_q``: the factor on the head's query (default 1e-5): near 0 the attention is uniform over the visible
      keys (Ships' "undifferentiated attention", arXiv 2410.13708).
    * ``norm_preserving``: the factor on the heads' ``z`` (default 0), after which the layer's attention output is
      rescaled to its norm before scaling (per example and position).

    A γ the mode would ignore is a :class:`MechcliffError` (:func:`check_gamma`).

    Args:
        handle: the loaded model (:func:`mechcliff.load_model`).
        heads: the heads, as ``"L2H3"`` labels or ``(layer, head)`` pairs.
        mode: one of :data:`MODES` (above).
        gamma: γ of the mode (above); None for its default.
        mean_z: for ``mode="mean"`` only: ``[n_layers, n_heads, d_head]`` mean outputs
            (:func:`mean_head_outputs`).

    Yields:
        the :class:`HeadIntervention` applied (heads, mode, γ).
    """
    parsed = validate(handle, heads, mode, gamma)
    gamma = check_gamma(mode, gamma)
    if mode == "mean" and mean_z is None:
        raise MechcliffError("mode 'mean' needs mean_z (see mechcliff.interventions.mean_head_outputs)")
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in parsed:
        by_layer[layer].append(head)
    hooks = []
    g = float(gamma)
    for layer, hs in sorted(by_layer.items()):
        idx = torch.tensor(sorted(set(hs)), dtype=torch.long)
        if mode in ("scale_z", "zero"):
            hooks.append((act_name("z", layer), _scale_hook(idx, g)))
        elif mode == "mean":
            hooks.append((act_name("z", layer), _mean_hook(idx, torch.as_tensor(mean_z)[layer])))
        elif mode == "scale_q":
            hooks.append((_query_hook_name(handle, layer), _scale_hook(idx, g)))
        else:
            hooks.append((act_name("z", layer), _norm_preserving_hook(idx, g)))
    spec = HeadIntervention(heads=parsed, mode=mode, gamma=g, mean_z=mean_z)
    with handle.bridge.hooks(fwd_hooks=hooks):
        yield spec


def _query_hook_name(handle: ModelHandle, layer: int) -> str:
    """The last hook on the queries before the scores: after rotary (and after Qwen3/Gemma3 query norms, which
    would undo a scaling applied before them); plain ``hook_q`` where the architecture has no rotary hook."""
    name = act_name("rot_q", layer)
    return name if name in handle.bridge.hook_dict else act_name("q", layer)


def _scale_hook(idx: torch.Tensor, gamma: float):
    def hook(t: torch.Tensor, hook: Any) -> torch.Tensor:
        t = t.clone()
        t[:, :, idx] = t[:, :, idx] * gamma
        return t

    return hook


def _mean_hook(idx: torch.Tensor, mean: torch.Tensor):
    def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z = z.clone()
        z[:, :, idx] = mean[idx].to(z.dtype).to(z.device)
        return z

    return hook


def _norm_preserving_hook(idx: torch.Tensor, gamma: float):
    # The RefusalCliff code restores one Frobenius norm over the whole [batch, pos, heads] tensor, which makes an
    # example's output depend on its batch-mates, on padding and on prefill vs cached steps. We restore the norm
    # over heads per example and position: the same rescaling idea, but batch-invariant.
    def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
        before = z.norm(dim=(-2, -1), keepdim=True)
        z = z.clone()
        z[:, :, idx] = z[:, :, idx] * gamma
        after = z.norm(dim=(-2, -1), keepdim=True)
        return torch.where(after > 0, z * (before / after.clamp_min(1e-30)), z)

    return hook


@torch.no_grad()
def mean_head_outputs(handle: ModelHandle, batch: Any, batch_size: int = 16) -> torch.Tensor:
    """Mean ``z`` of every head over the real (unpadded) tokens of ``batch``: ``[n_layers, n_heads, d_head]``."""
    total = torch.zeros(handle.n_layers, handle.n_heads, handle.d_head, dtype=torch.float64)
    count = 0

    def summed(z: torch.Tensor, where: Any) -> torch.Tensor:
        return z[where.mask_on(z)].double().sum(0)

    names = [act_name("z", l) for l in range(handle.n_layers)]
    for chunk in capture(handle, batch, {n: summed for n in names}, batch_size=batch_size,
                         max_tokens=MAX_TOKENS):
        for layer, n in enumerate(names):
            total[layer] += chunk.values[n]
        count += int(chunk.where.attention_mask.bool().sum())
    return (total / max(count, 1)).float()


# --------------------------------------------------------------------------- MLP neurons as targets


def mlp_hook_name(handle: ModelHandle, layer: int) -> str:
    """The hook holding layer ``layer``'s MLP neuron activations (the input of its output projection)."""
    name = act_name("mlp_post", layer)
    if name not in handle.bridge.hook_dict:
        raise MechcliffError(f"{handle.model_id} has no MLP neuron hook {name} (an architecture without an MLP?)")
    return name


def d_mlp(handle: ModelHandle) -> int:
    """MLP width (neurons per layer)."""
    return int(handle.bridge.cfg.d_mlp)


def neuron_label(layer: int, index: int) -> str:
    return f"L{layer}N{index}"


def parse_neuron(label: "str | Sequence[int]") -> tuple[int, int]:
    """``"L3N17"`` or ``(3, 17)`` -> ``(3, 17)``."""
    if isinstance(label, str):
        s = label.strip().upper()
        try:
            if not s.startswith("L") or "N" not in s:
                raise ValueError
            layer_s, idx_s = s[1:].split("N", 1)
            return int(layer_s), int(idx_s)
        except ValueError:
            raise MechcliffError(f"cannot read neuron {label!r}: write neurons as 'L<layer>N<index>', e.g. 'L3N17'") from None
    layer, idx = label
    return int(layer), int(idx)


def check_neurons(handle: ModelHandle, neurons: Sequence[Any]) -> list[tuple[int, int]]:
    out = []
    width = d_mlp(handle)
    for n in neurons:
        l, j = parse_neuron(n)
        if not (0 <= l < handle.n_layers and 0 <= j < width):
            raise MechcliffError(f"neuron {neuron_label(l, j)} does not exist: {handle.model_id} has {handle.n_layers} "
                                 f"layers x {width} MLP neurons")
        out.append((l, j))
    return out


@contextlib.contextmanager
def ablate_neurons(handle: ModelHandle, neurons: Sequence[Any], value: float = 0.0) -> Iterator[list[tuple[int, int]]]:
    """Set ``neurons`` (``(layer, index)`` or ``"L3N17"``) to ``value`` (0: zero-ablation) in every forward pass and
    generation step inside the ``with`` block. Weights are never modified."""
    parsed = check_neurons(handle, neurons)
    by_layer: dict[int, list[int]] = {}
    for l, j in parsed:
        by_layer.setdefault(l, []).append(j)

    def make(idx: torch.Tensor):
        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            x = x.clone()
            x[..., idx.to(x.device)] = value
            return x

        return hook

    hooks = [(mlp_hook_name(handle, l), make(torch.tensor(sorted(set(js)), dtype=torch.long)))
             for l, js in sorted(by_layer.items())]
    with handle.bridge.hooks(fwd_hooks=hooks):
        yield parsed
