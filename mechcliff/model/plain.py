"""The fast reading path: activations read with plain PyTorch hooks while the Hugging Face model runs its own
attention (sdpa / flash), not the bridge's re-implementation of it (issue 17, item 1).

The TransformerBridge wraps the HF modules in place and re-implements attention so that it can expose the scores and
the pattern: it materialises ``heads × T²`` scores per row and layer and costs 1.4–2.1× the plain HF forward at
1–4k tokens. Most analyses never read the pattern. They read the residual stream, the per-head outputs ``z`` (the
input of ``o_proj``), and the attention and MLP outputs, and the plain HF modules compute all of these:

============  ==========================================  =======================================
site          bridge hook                                 plain hook
============  ==========================================  =======================================
resid_pre     ``blocks.L.hook_resid_pre``                 decoder layer L's input (forward pre-hook)
resid_post    ``blocks.L.hook_resid_post``                decoder layer L's output (forward hook)
z             ``blocks.L.attn.hook_z``                    ``o_proj``'s input, viewed ``[.., head, d_head]``
attn_out      ``blocks.L.hook_attn_out``                  ``o_proj``'s output
mlp_out       ``blocks.L.hook_mlp_out``                   the MLP's output
mlp_post      ``blocks.L.mlp.hook_post``                  ``down_proj``'s input
embed         ``hook_embed``                              the token embedding's output
ln_final      ``ln_final.hook_out``                       the final norm's output
============  ==========================================  =======================================

:func:`plain_model` swaps the bridge's components out of the HF model for the modules they wrap (and back
afterwards, whatever happens) and switches the model to its fast attention for the duration. :func:`plain_sites`
finds the modules of each site from the bridge. Which sites the plain path may serve on a model is decided at load by
the conformance check ``plain_reads`` (both paths, same activations, to the dtype's tolerance): a site that differs
on an architecture is read through the bridge there (:func:`verified_sites`). Attention patterns, queries and keys
stay on the bridge.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from mechcliff.errors import MechcliffError
from mechcliff.model.sites import act_name

if TYPE_CHECKING:
    from mechcliff.model.handle import ModelHandle

#: Per-layer sites the plain path can read: short name → (the bridge component of a block whose wrapped HF module
#: carries it, ``"pre"`` its input / ``"post"`` its output). The rows of the module docstring's table.
LAYER_SITES: dict[str, tuple[str, str]] = {
    "resid_pre": ("", "pre"), "resid_post": ("", "post"),  # "": the decoder layer itself
    "z": ("attn.o", "pre"), "attn_out": ("attn.o", "post"),
    "mlp_out": ("mlp", "post"), "mlp_post": ("mlp.out", "pre"),
}
#: Sites outside the blocks: short name → the bridge component whose wrapped module's output it is.
GLOBAL_PLAIN_SITES: dict[str, str] = {"embed": "embed", "ln_final": "ln_final"}
#: Every site the plain path can read (short names of :data:`mechcliff.model.sites.SITES` / ``GLOBAL_SITES``).
PLAIN_SITES = (*LAYER_SITES, *GLOBAL_PLAIN_SITES)
#: The attention implementations tried for the plain forward, fastest first (those the model supports).
FAST_ATTENTION = ("flash_attention_2", "sdpa")


def _is_bridge_component(m: torch.nn.Module) -> bool:
    return "_original_component" in m._modules and m._modules["_original_component"] is not None


def _bridge_swaps(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, name, bridge component) for every bridge component inside ``model``'s module tree, found by
    following each component's original module (the bridge's own children are never entered)."""
    swaps: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []

    def walk(m: torch.nn.Module) -> None:
        for name, child in m._modules.items():
            if child is None:
                continue
            if _is_bridge_component(child):
                swaps.append((m, name, child))
                walk(child._modules["_original_component"])  # type: ignore[arg-type]
            else:
                walk(child)

    walk(model)
    return swaps


def fast_attention(hf_model: Any) -> str:
    """The attention implementation the plain path runs: the model's own when it was loaded with a fast one
    (``attn_implementation="flash_attention_2"``; the load switches the model to eager for the bridge and remembers
    it), else ``"sdpa"`` where the model supports it, else ``"eager"``."""
    current = (getattr(hf_model, "_mechcliff_fast_attention", None)
               or getattr(hf_model.config, "_attn_implementation", None) or "eager")
    if current in FAST_ATTENTION:
        return str(current)
    return "sdpa" if getattr(hf_model, "_supports_sdpa", False) else str(current)


def _configs(hf_model: Any) -> list[Any]:
    """The model's config and its sub-configs that carry an attention implementation (Gemma3 and other composite
    models), each once."""
    seen: dict[int, Any] = {}
    todo = [hf_model.config]
    while todo:
        cfg = todo.pop()
        if id(cfg) in seen or not hasattr(cfg, "_attn_implementation"):
            continue
        seen[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", {}) or {}:
            sub = getattr(cfg, key, None)
            if sub is not None:
                todo.append(sub)
    return list(seen.values())


@contextlib.contextmanager
def plain_model(handle: ModelHandle, attention: str | None = None) -> Iterator[torch.nn.Module]:
    """Inside the block, ``handle.hf_model`` is the plain Hugging Face model (no bridge components, no bridge hooks)
    running ``attention`` (default :func:`fast_attention`); yields its base model (the decoder stack without the
    unembedding). Everything is put back on exit, also when the forward raises."""
    hf = handle.hf_model
    swaps = _bridge_swaps(hf)
    impl = attention or fast_attention(hf)
    configs = _configs(hf)
    old = [c._attn_implementation for c in configs]
    try:
        for parent, name, component in swaps:
            parent._modules[name] = component._modules["_original_component"]
        for c in configs:
            c._attn_implementation = impl
        yield hf.base_model
    finally:
        for c, o in zip(configs, old):
            c._attn_implementation = o
        for parent, name, component in reversed(swaps):
            parent._modules[name] = component


PlainHook = Callable[[torch.Tensor], None]


def plain_sites(handle: ModelHandle) -> dict[str, tuple[torch.nn.Module, str]]:
    """Hook name → (plain module, ``"pre"`` input / ``"post"`` output) of every :data:`PLAIN_SITES` site of every
    layer, found through the bridge's components; ``{}`` when the architecture is not laid out as the table of the
    module docstring (its reads then all go through the bridge)."""
    def wrapped(component: Any) -> torch.nn.Module:
        module = component.original_component
        if module is None:  # a block laid out otherwise: every read through the bridge
            raise AttributeError("a bridge component without an HF module")
        return module

    out: dict[str, tuple[torch.nn.Module, str]] = {}
    try:
        for layer in range(handle.n_layers):
            block = handle.bridge.blocks[layer]
            for site, (path, kind) in LAYER_SITES.items():
                out[act_name(site, layer)] = (wrapped(block.get_submodule(path) if path else block), kind)
        for site, name in GLOBAL_PLAIN_SITES.items():  # one missing here only sends that site to the bridge
            module = getattr(getattr(handle.bridge, name, None), "original_component", None)
            if module is not None:
                out[act_name(site)] = (module, "post")
    except (AttributeError, IndexError, TypeError):
        return {}
    return out


def verified_sites(handle: ModelHandle) -> frozenset[str]:
    """The hook names the plain path serves on ``handle``: those the load-time check ``plain_reads`` found equal to
    the bridge's (none when the check did not run, e.g. ``check=False``, or ``handle.extra["fast_reads"]`` is
    False)."""
    if handle.extra.get("fast_reads") is False:
        return frozenset()
    return frozenset(handle.extra.get("plain_sites", ()))


def active_bridge_hooks(handle: ModelHandle) -> list[str]:
    """Names of the bridge's hook points that have a hook on them now (an :func:`mechcliff.interventions.intervene`
    block, a user's ``bridge.hooks(...)``; aliases included)."""
    hook_dict = getattr(handle.bridge, "hook_dict", {}) or {}
    return [n for n, hp in hook_dict.items()
            if getattr(hp, "_forward_hooks", None) or getattr(hp, "_forward_pre_hooks", None)]


def _hooked_points(handle: ModelHandle) -> tuple[list[tuple[torch.nn.Module, str, torch.nn.Module]], list[str]]:
    """The hook points with hooks on them now, as ``(plain module, kind, hook point)`` where the hook point is a
    verified site (each once, aliases merged), and the names of those that are not (they need the bridge)."""
    hook_dict = getattr(handle.bridge, "hook_dict", {}) or {}
    sites = plain_sites(handle)
    verified = verified_sites(handle)
    where = {id(hook_dict[n]): sites[n] for n in verified if n in hook_dict and n in sites}
    points: dict[int, tuple[torch.nn.Module, str, torch.nn.Module]] = {}
    elsewhere: list[str] = []
    for name in active_bridge_hooks(handle):
        hp = hook_dict[name]
        if id(hp) in where:
            points[id(hp)] = (*where[id(hp)], hp)
        else:
            elsewhere.append(name)
    return list(points.values()), elsewhere


def unservable_hooks(handle: ModelHandle) -> list[str]:
    """Hook points with hooks on them now that the plain path cannot run (bridge-only sites such as attention
    patterns or queries, or sites not verified on this model): while there is one, captures use the bridge."""
    return _hooked_points(handle)[1]


def _run_hook_point(module: torch.nn.Module, kind: str, hp: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Run the bridge hook point ``hp`` (its hooks, with TransformerLens's own layout conversion and aliases) on the
    plain module's input (``"pre"``) or output (``"post"``), whose raw tensor is the one the bridge hands it."""
    if kind == "pre":
        def pre(m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if args:
                return (hp(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hp(kwargs["hidden_states"])}

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(m: torch.nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (hp(output[0]), *output[1:])
        return hp(output)

    return module.register_forward_hook(post)


def register(module: torch.nn.Module, kind: str, name: str, fn: PlainHook, n_heads: int
             ) -> torch.utils.hooks.RemovableHandle:
    """A plain hook on ``module`` that hands ``fn`` the site's activation in the bridge's layout (``z`` as
    ``[batch, pos, head, d_head]``)."""
    is_z = name.endswith("attn.hook_z")

    def view(x: Any) -> torch.Tensor:
        x = x[0] if isinstance(x, tuple) else x
        if not isinstance(x, torch.Tensor):  # pragma: no cover - a module with an unexpected signature
            raise MechcliffError(f"plain hook {name}: expected a tensor, got {type(x).__name__}")
        return x.unflatten(-1, (n_heads, -1)) if is_z else x

    if kind == "pre":
        def pre(m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            fn(view(args[0] if args else kwargs["hidden_states"]))

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(m: torch.nn.Module, args: Any, output: Any) -> None:
        fn(view(output))

    return module.register_forward_hook(post)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded batch as the bridge derives them: each row counts its real tokens from 0
    (padding gets 0; it is masked out of every attention anyway)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def run(handle: ModelHandle, tokens: torch.Tensor, mask: torch.Tensor,
        hooks: dict[str, PlainHook]) -> None:
    """One forward of the plain base model on ``tokens`` / ``mask`` (already on the model's device) with a plain
    hook per hook name (:func:`plain_sites`); no KV cache is built. The hooks may end the forward by raising.

    Hooks in force on the bridge's hook points (interventions) act here too, at the same tensors and before the
    readers see them, as on the bridge; one on a site the plain path does not serve is an error."""
    sites = plain_sites(handle)
    missing = [n for n in hooks if n not in sites]
    if missing:
        raise MechcliffError(f"the plain path cannot read {', '.join(missing)} on {handle.model_id}")
    points, elsewhere = _hooked_points(handle)
    if elsewhere:
        raise MechcliffError(f"hooks on {', '.join(elsewhere[:3])} run on the bridge only: read through the bridge")
    with plain_model(handle) as base:
        handles = [_run_hook_point(*p) for p in points]
        handles += [register(*sites[n], n, fn, handle.n_heads) for n, fn in hooks.items()]
        try:
            base(input_ids=tokens, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
        finally:
            for h in handles:
                h.remove()
