"""Workarounds for upstream bugs, each applied to one booted bridge (never globally) and each naming its cause.

The load-time conformance check (:mod:`mechcliff.model.conformance`) is what proves a workaround is still needed
and still enough: every fast path mechcliff relies on is compared with its slow reference at every load.
"""

from __future__ import annotations

import inspect
from typing import Any


def _takes_cache_kwarg(hf_attention: Any) -> bool:
    """Whether a Hugging Face attention module's ``forward`` names its KV cache ``cache`` (transformers >= 5.24)."""
    forward = inspect.unwrap(type(hf_attention).forward)
    try:
        return "cache" in inspect.signature(forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins or C extensions
        return False


def _cache_as_past_key_values(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    if "cache" in kwargs and "past_key_values" not in kwargs:
        kwargs["past_key_values"] = kwargs.pop("cache")
    return args, kwargs


def route_cache_kwarg(bridge: Any) -> int:
    """Hand the KV cache to the bridge's attention under the name it reads; returns the number of modules patched.

    Upstream cause: transformers 5.24 renamed the keyword under which a decoder layer passes the KV cache to its
    attention module from ``past_key_values`` to ``cache`` (``@deprecate_kwarg("past_key_values", "5.40.0",
    new_name="cache")`` on every ``*Attention.forward``). TransformerLens 4.3.0's bridged attention
    (``AttentionBridge._update_kv_cache``) reads only ``past_key_values`` / ``layer_past``, so under 5.24 it finds
    no cache: cached keys and values are never stored or read, and every cached step attends to its own tokens only
    (a KV-cached suffix differs from the full forward, and generation changes) with no error. A forward pre-hook on
    each bridged attention module renames ``cache`` back to ``past_key_values`` before TransformerLens reads it; on
    transformers < 5.24 the keyword is already ``past_key_values`` and nothing is patched.
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    patched = 0
    for module in bridge.modules():
        original = getattr(module, "original_component", None)
        if isinstance(module, AttentionBridge) and original is not None and _takes_cache_kwarg(original):
            module.register_forward_pre_hook(_cache_as_past_key_values, with_kwargs=True)
            patched += 1
    return patched
