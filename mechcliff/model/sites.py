"""Hook sites by short name, and the only functions that format or parse hook names (:func:`act_name`,
:func:`layer_of`); :mod:`mechcliff.model.capture` re-exports them."""

from __future__ import annotations

import re

from mechcliff.errors import MechcliffError

#: Per-layer hook sites, by short name (TransformerBridge names): the ones mechcliff reads or writes, each checked
#: to fire on every supported architecture (tests/test_upstream_regressions.py). Add a site here and there together.
SITES: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "mlp_post": "mlp.hook_post",  # MLP neuron activations: the input of the down projection
    "z": "attn.hook_z",  # per-head attention outputs before W_O: the o_proj input
    "q": "attn.hook_q",
    "rot_q": "attn.hook_rot_q",  # queries after rotary (and after Qwen3 / Gemma3 query norms)
    "pattern": "attn.hook_pattern",
}
#: Hook sites outside the blocks.
GLOBAL_SITES: dict[str, str] = {"embed": "hook_embed", "ln_final": "ln_final.hook_out"}
#: Sites whose position axis is the query axis of ``[batch, head, query, key]``.
_QUERY_AXIS_SITES = ("attn.hook_pattern",)
_LAYER = re.compile(r"^blocks\.(\d+)\.")


def act_name(site: str, layer: int | None = None) -> str:
    """The hook name of ``site`` (a key of :data:`SITES` or :data:`GLOBAL_SITES`) at ``layer``."""
    if site in GLOBAL_SITES:
        if layer is not None:
            raise MechcliffError(f"hook site {site!r} has no layer (got layer={layer})")
        return GLOBAL_SITES[site]
    if site not in SITES:
        raise MechcliffError(f"unknown hook site {site!r}; use one of {', '.join([*SITES, *GLOBAL_SITES])}")
    if layer is None or int(layer) < 0:
        raise MechcliffError(f"hook site {site!r} needs a layer >= 0 (got {layer})")
    return f"blocks.{int(layer)}.{SITES[site]}"


def site_of(name: str) -> str:
    """The site of a hook name without its layer (``"blocks.3.attn.hook_z"`` → ``"attn.hook_z"``); a hook outside
    the blocks is its own site."""
    return name.split(".", 2)[2] if _LAYER.match(name) else name


def layer_of(name: str) -> int:
    """The layer of a per-layer hook name (``"blocks.3.attn.hook_z"`` → 3)."""
    m = _LAYER.match(name)
    if m is None:
        raise MechcliffError(f"hook {name!r} is not inside a block (no layer)")
    return int(m.group(1))
