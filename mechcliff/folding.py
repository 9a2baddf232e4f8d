"""Interventions folded into weights: ablated generation at serving-engine speed, exactly.

The interventions that act on every position the same way are linear edits of one weight matrix:

* a head's ``scale_z`` / ``zero`` (:func:`~mechcliff.interventions.intervene`, hook ``blocks.{l}.attn.hook_z``, the
  input of the layer's ``o_proj``): the head's input columns of ``o_proj``, ``W[:, h*d_head:(h+1)*d_head]``, times
  γ (0 for ``zero``);
* a head's ``mean``: those columns zeroed, and ``W_O_h @ mean_z_h`` added to the ``o_proj`` bias (a bias is added
  where the architecture has none);
* a head's ``scale_q`` (arXiv 2410.13708), on architectures without a query norm (Llama, Qwen2): the head's rows of
  ``q_proj`` (and of its bias) times γ. Rotary embedding is a rotation, so it commutes with the scaling. Qwen3 and
  Gemma3 normalise each head's query after ``q_proj`` with one ``q_norm`` shared by all heads, which undoes any
  scaling before it; no per-head weight sits after the norm, so ``scale_q`` is not folded there;
* an MLP neuron set to ``value`` (:func:`~mechcliff.interventions.ablate_neurons`, hook ``blocks.{l}.mlp.hook_post``,
  the input of ``down_proj``): its ``down_proj`` input column zeroed, and ``value * W[:, j]`` added to the
  ``down_proj`` bias when ``value != 0``.

``norm_preserving`` rescales each position's attention output to its norm before scaling, a function of the
activations that no weight edit equals; interventions restricted to some positions are not the same at every
position. Both stay on the hooked path (:func:`can_fold` says why).

:func:`fold` never modifies the original model: it builds a plain Hugging Face model (no bridge, no hooks) of the
same class and config whose untouched tensors are *the original's tensors* (shared, no copy) and whose touched
tensors (the edited ``o_proj`` / ``q_proj`` / ``down_proj`` of the edited layers) are fresh copies. A fold costs the
memory of the touched matrices only, not of a second model. ``copy_all=True`` copies every tensor instead (a model
that can be trained or edited further without touching the original).

Usage::

    folded = fold(handle, ["L1H3", "L2H1"], mode="zero")
    rollouts = generate_rollouts(folded.handle, prompts)        # plain HF generate, no hooks
    folded.save("out/")                                           # a standard HF folder (+ mechcliff_edit.json)

:func:`ablated_generation` is what the ASR experiments use: the folded copy when :func:`can_fold` allows it, the
hooked model otherwise, and which of the two it was.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from mechcliff.errors import MechcliffError
from mechcliff.head_scores import head_label
from mechcliff.interventions import ablate_neurons, check_gamma, check_neurons, intervene, neuron_label, validate

if TYPE_CHECKING:
    from mechcliff.model.handle import ModelHandle

EDIT_FILE = "mechcliff_edit.json"
"""The file :meth:`FoldedModel.save` writes next to the Hugging Face files: what was folded, into what."""

FOLDABLE_MODES = ("scale_z", "zero", "mean", "scale_q")
"""The head modes :func:`fold` can fold (``scale_q`` only without a query norm, see the module docstring)."""


@dataclasses.dataclass(frozen=True)
class FoldCheck:
    """Whether an intervention can be folded, and why not; true in a boolean context when it can."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


def _layers(model: Any) -> Any:
    """The decoder layers of a (plain or bridge-wrapped) HF causal LM."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        dec = model.get_decoder() if hasattr(model, "get_decoder") else None
        layers = getattr(dec, "layers", None)
    if layers is None:
        raise MechcliffError(f"cannot find the decoder layers of {type(model).__name__} (model.layers)")
    return layers


def _unwrap(module: Any) -> Any:
    """The HF module inside a bridge wrapper (the module itself when it is not wrapped)."""
    while hasattr(module, "_original_component"):
        module = module._original_component
    return module


def _attn(model: Any, layer: int) -> Any:
    return _unwrap(getattr(_unwrap(_layers(model)[layer]), "self_attn"))


def _mlp(model: Any, layer: int) -> Any:
    return _unwrap(getattr(_unwrap(_layers(model)[layer]), "mlp"))


def _has_bias_flag(config: Any, what: str) -> str | None:
    """The config flag that gives every layer's ``o_proj`` (``what="attn"``) / ``down_proj`` (``"mlp"``) a bias,
    when the architecture has one: ``attention_bias`` (Llama, Qwen3, Gemma3: q, k, v and o), ``mlp_bias`` (Llama)."""
    if what == "attn":
        return "attention_bias" if hasattr(config, "attention_bias") and config.model_type != "qwen2" else None
    return "mlp_bias" if hasattr(config, "mlp_bias") else None


def can_fold(mode: str | None = "scale_z", handle: "ModelHandle | None" = None, *, neuron_value: float = 0.0,
             neurons: bool = False, positions: Any = None, export: bool = False) -> FoldCheck:
    """Whether the intervention ``mode`` (on heads; ``None`` for neurons only) can be folded into weights exactly.

    Args:
        mode: a mode of :data:`~mechcliff.interventions.MODES`, or None when only neurons are edited.
        handle: the model; needed for ``scale_q`` (it depends on the architecture's query norm) and ``export``.
        neuron_value: the value neurons are set to (``neurons=True``).
        neurons: MLP neurons are edited too.
        positions: the intervention is restricted to these positions (anything but None): never folded.
        export: the folded model must also be saved and reloaded by plain ``transformers``: the added biases
            (``mean`` mode, neurons set to a non-zero value) need a config flag that gives the layers a bias.

    Returns:
        a :class:`FoldCheck`: ``ok`` and, when not, the ``reason``.
    """
    if positions is not None:
        return FoldCheck(False, "the intervention is restricted to some positions; a weight edit acts on all of them")
    if mode is not None:
        if mode == "norm_preserving":
            return FoldCheck(False, "norm_preserving rescales each position's attention output back to its norm "
                                    "before scaling, a function of the activations that no weight edit equals")
        if mode not in FOLDABLE_MODES:
            return FoldCheck(False, f"unknown intervention mode {mode!r}")
        if mode == "scale_q":
            if handle is None:
                return FoldCheck(False, "scale_q can be folded only on architectures without a query norm: pass the "
                                        "model (handle=) to decide")
            if getattr(_attn(handle.hf_model, 0), "q_norm", None) is not None:
                return FoldCheck(False, f"scale_q: {type(handle.hf_model).__name__} normalises each head's query "
                                        "after q_proj with one q_norm shared by all heads, which undoes a scaling of "
                                        "the head's q_proj rows; no per-head weight sits after the norm")
    if handle is not None:
        device_map = getattr(handle.hf_model, "hf_device_map", None)
        if isinstance(device_map, dict) and len(set(device_map.values())) > 1:
            return FoldCheck(False, "the model is dispatched over several devices (device_map); the folded copy "
                                    "would lose accelerate's dispatch hooks")
        try:
            _attn(handle.hf_model, 0).o_proj  # noqa: B018 - the modules the edits go into
            if neurons:
                _mlp(handle.hf_model, 0).down_proj  # noqa: B018
        except (AttributeError, MechcliffError, IndexError):
            return FoldCheck(False, f"{type(handle.hf_model).__name__} has no layers[l].self_attn.o_proj / "
                                    "mlp.down_proj to fold into")
    if export:
        if handle is None:
            return FoldCheck(False, "export: pass the model (handle=) to decide")
        cfg = handle.hf_model.config
        if mode == "mean" and _has_bias_flag(cfg, "attn") is None:
            return FoldCheck(False, f"export of mode 'mean' needs an o_proj bias, and the {cfg.model_type} config has "
                                    "no flag that gives o_proj one (Qwen2's q/k/v biases are fixed, o_proj has none): "
                                    "plain transformers would drop it on reload")
        if neurons and neuron_value != 0.0 and _has_bias_flag(cfg, "mlp") is None:
            return FoldCheck(False, f"export of neurons set to {neuron_value:g} needs a down_proj bias, and the "
                                    f"{cfg.model_type} config has no mlp_bias flag")
    return FoldCheck(True, "every edit is a fixed linear map at every position: folded into the weights")


def _plain_copy(hf_model: Any, copy_all: bool) -> Any:
    """A plain HF model of ``hf_model``'s class and config (bridge wrappers removed) whose parameters and buffers
    are ``hf_model``'s own tensors (``copy_all``: clones of them). Built on the meta device: no weight is allocated
    here."""
    config = copy.deepcopy(hf_model.config)
    with torch.device("meta"):
        plain = type(hf_model)(config)
    tensors = list(hf_model.named_parameters(remove_duplicate=False))
    tensors += list(hf_model.named_buffers(remove_duplicate=False))
    clones: dict[int, Any] = {}
    for name, t in tensors:
        path = name.replace("._original_component", "").replace("_original_component.", "")
        parent_name, _, leaf = path.rpartition(".")
        try:
            parent = plain.get_submodule(parent_name)
        except AttributeError:
            continue
        current = getattr(parent, leaf, None)
        if current is None:  # a tensor the bridge added (e.g. a zero lm_head bias buffer): not part of the HF model
            continue
        if copy_all:
            t = clones.setdefault(id(t), torch.nn.Parameter(t.detach().clone(), requires_grad=False)
                                  if isinstance(t, torch.nn.Parameter) else t.detach().clone())
        if isinstance(current, torch.nn.Parameter):
            parent._parameters[leaf] = t if isinstance(t, torch.nn.Parameter) else torch.nn.Parameter(t, False)
        else:
            parent._buffers[leaf] = t
    left = [n for n, t in list(plain.named_parameters()) + list(plain.named_buffers()) if t.is_meta]
    if left:
        raise MechcliffError(f"folding: could not map {len(left)} tensors of the HF model ({', '.join(left[:3])} ...)")
    plain.generation_config = copy.deepcopy(hf_model.generation_config)
    return plain.eval()


def _set_weight(linear: torch.nn.Linear, weight: torch.Tensor) -> None:
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)


def _add_bias(linear: torch.nn.Linear, extra: torch.Tensor | None = None) -> None:
    """Give ``linear`` its own bias (a copy of the old one, or zeros), plus ``extra``."""
    w = linear.weight
    old = linear.bias
    bias = old.detach().clone() if old is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    if extra is not None:
        bias = bias + extra.to(bias.dtype).to(bias.device)
    linear.bias = torch.nn.Parameter(bias, requires_grad=False)


@dataclasses.dataclass
class FoldedModel:
    """A plain Hugging Face model with an intervention folded into its weights (:func:`fold`).

    ``model`` is the HF causal LM (``model.generate`` needs no mechcliff); ``handle`` is a handle for
    :func:`~mechcliff.generation.generate_rollouts` whose ``hf_model`` is ``model`` (it has no bridge: activations
    are not readable through it); ``edit`` is what was folded (the content of ``mechcliff_edit.json``)."""

    model: Any
    tokenizer: Any
    edit: dict[str, Any]
    handle: Any = dataclasses.field(default=None, repr=False)

    def save(self, out: str | Path) -> Path:
        """Write a standard HF folder (``save_pretrained``: safetensors, config, tokenizer) and ``EDIT_FILE``.

        The folded model must have been built with ``export=True`` (:func:`fold`), so that every tensor it holds is
        one plain ``transformers`` loads back."""
        if not self.edit.get("export"):
            raise MechcliffError("this folded model was built without export=True: build it with fold(..., "
                                 "export=True) to save it (the added biases need the config's bias flags)")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        (out / EDIT_FILE).write_text(json.dumps(self.edit, indent=1) + "\n")
        return out

    def free(self) -> None:
        """Drop the references to the model (its copied tensors are freed once nothing else holds them)."""
        self.model = None
        if self.handle is not None:
            self.handle.hf_model = None


class _NoBridge:
    """The bridge of a folded model's handle: there is none (the folded model is a plain HF model)."""

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"a folded model's handle has no bridge (no '{name}'): it is for generation only; "
                             "read activations with the original handle under intervene()")

    def __repr__(self) -> str:
        return "<no bridge: folded model>"


def fold(
    handle: ModelHandle,
    heads: Sequence[Any] = (),
    *,
    mode: str = "scale_z",
    gamma: float | None = None,
    mean_z: Any = None,
    neurons: Sequence[Any] = (),
    neuron_value: float = 0.0,
    export: bool = False,
    copy_all: bool = False,
) -> FoldedModel:
    """Fold a head intervention (``heads`` under ``mode``/``gamma``/``mean_z``, as
    :func:`~mechcliff.interventions.intervene` takes them) and an MLP neuron edit (``neurons`` set to
    ``neuron_value``, as :func:`~mechcliff.interventions.ablate_neurons`) into the weights of a plain copy of the
    model. The original model is never modified (module docstring: only touched tensors are copied).

    Args:
        handle: the loaded model (:func:`mechcliff.load_model`).
        heads: heads (``"L2H3"`` or ``(layer, head)``); may be empty.
        mode: ``scale_z``, ``zero``, ``mean`` or ``scale_q`` (:func:`can_fold` says which fold on this model).
        gamma: γ of the mode (its default when None; :func:`~mechcliff.interventions.check_gamma`).
        mean_z: for ``mode="mean"``: ``[n_layers, n_heads, d_head]`` (:func:`~mechcliff.interventions.mean_head_outputs`).
        neurons: MLP neurons (``"L3N17"`` or ``(layer, index)``); may be empty.
        neuron_value: the value the neurons are set to (0: zero-ablation).
        export: also set the config flags the added biases need, with zero biases on every layer those flags
            cover, so that :meth:`FoldedModel.save` writes a folder plain ``transformers`` reloads exactly.
        copy_all: copy every tensor, not only the touched ones.

    Raises:
        MechcliffError: when the intervention cannot be folded (the reason of :func:`can_fold`), or on bad input.
    """
    from mechcliff.model.handle import ModelHandle

    parsed = validate(handle, heads, mode, gamma) if heads else []
    g = check_gamma(mode, gamma)
    parsed_neurons = check_neurons(handle, neurons) if neurons else []
    if not parsed and not parsed_neurons:
        raise MechcliffError("fold: no heads and no neurons to fold")
    value = float(neuron_value)
    check = can_fold(mode if parsed else None, handle, neuron_value=value, neurons=bool(parsed_neurons),
                     export=export)
    if not check:
        raise MechcliffError(f"cannot fold this intervention: {check.reason}")
    if parsed and mode == "mean" and mean_z is None:
        raise MechcliffError("mode 'mean' needs mean_z (see mechcliff.interventions.mean_head_outputs)")
    plain = _plain_copy(handle.hf_model, copy_all)
    d_head = handle.d_head
    cfg = plain.config
    need_attn_bias = bool(parsed) and mode == "mean"
    need_mlp_bias = bool(parsed_neurons) and value != 0.0
    by_layer: dict[int, set[int]] = defaultdict(set)
    for layer, head in parsed:
        by_layer[layer].add(head)
    with torch.no_grad():
        for layer, hs in sorted(by_layer.items()):
            attn = _attn(plain, layer)
            if mode == "scale_q":
                q = attn.q_proj
                w = q.weight.detach().clone()
                b = q.bias.detach().clone() if q.bias is not None else None
                for h in sorted(hs):
                    w[h * d_head:(h + 1) * d_head] *= g
                    if b is not None:
                        b[h * d_head:(h + 1) * d_head] *= g
                _set_weight(q, w)
                if b is not None:
                    q.bias = torch.nn.Parameter(b, requires_grad=False)
                continue
            o = attn.o_proj
            w_orig = o.weight.detach()
            w = w_orig.clone()
            extra = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
            for h in sorted(hs):
                cols = slice(h * d_head, (h + 1) * d_head)
                if mode == "mean":
                    m = torch.as_tensor(mean_z)[layer, h].to(w.device)
                    extra += w_orig[:, cols].double() @ m.double()
                    w[:, cols] = 0
                else:
                    w[:, cols] *= g
            _set_weight(o, w)
            if mode == "mean":
                _add_bias(o, extra)
        by_mlp: dict[int, set[int]] = defaultdict(set)
        for layer, j in parsed_neurons:
            by_mlp[layer].add(j)
        for layer, js in sorted(by_mlp.items()):
            down = _mlp(plain, layer).down_proj
            w_orig = down.weight.detach()
            w = w_orig.clone()
            idx = torch.tensor(sorted(js), dtype=torch.long, device=w.device)
            if value != 0.0:
                _add_bias(down, value * w_orig[:, idx].double().sum(1))
            w[:, idx] = 0
            _set_weight(down, w)
        if export:  # the config flags that make plain transformers build (and load) the biases we added
            if need_attn_bias:
                flag = _has_bias_flag(cfg, "attn")
                setattr(cfg, flag, True)  # type: ignore[arg-type]
                for layer in range(handle.n_layers):
                    attn = _attn(plain, layer)
                    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                        if getattr(attn, name).bias is None:
                            _add_bias(getattr(attn, name))
            if need_mlp_bias:
                setattr(cfg, "mlp_bias", True)
                for layer in range(handle.n_layers):
                    mlp = _mlp(plain, layer)
                    for name in ("gate_proj", "up_proj", "down_proj"):
                        if getattr(mlp, name).bias is None:
                            _add_bias(getattr(mlp, name))
    from mechcliff.versions import __version__

    edit: dict[str, Any] = {
        "heads": [head_label(h) for h in parsed], "mode": mode if parsed else None,
        "gamma": float(g) if parsed else None,
        "neurons": [neuron_label(l, j) for l, j in parsed_neurons], "neuron_value": value if parsed_neurons else None,
        "source_model": handle.model_id, "source_weights_fingerprint": handle.model_hash,
        "architecture": type(plain).__name__, "mechcliff_version": __version__, "export": bool(export),
        "config_flags_set": ([_has_bias_flag(cfg, "attn")] if export and need_attn_bias else [])
        + (["mlp_bias"] if export and need_mlp_bias else []),
    }
    gen_handle = ModelHandle(bridge=_NoBridge(), hf_model=plain, tokenizer=handle.tokenizer,
                             model_id=f"{handle.model_id} (folded)", model_hash=handle.model_hash,
                             think=handle.think, exact_decomposition=False, conformance=None,
                             extra={"folded": edit})
    return FoldedModel(model=plain, tokenizer=handle.tokenizer, edit=edit, handle=gen_handle)


@contextlib.contextmanager
def ablated_generation(
    handle: ModelHandle, heads: Sequence[Any], *, mode: str = "scale_z", gamma: float | None = None,
    mean_z: Any = None, neurons: Sequence[Any] = (), neuron_value: float = 0.0, use_fold: bool = True,
) -> Iterator[tuple[Any, dict[str, str]]]:
    """The handle to generate with under an intervention, and how: ``(gen_handle, {"path", "reason"})``.

    ``path`` is ``"folded"`` (a folded copy, :func:`fold`: plain HF ``generate``, no hooks) when ``use_fold`` and
    :func:`can_fold` allow it, else ``"hooked"`` (``handle`` itself under :func:`~mechcliff.interventions.intervene`
    / :func:`~mechcliff.interventions.ablate_neurons`); ``reason`` says why. The folded copy is made once on entry
    and freed on exit. Only generation should go through ``gen_handle`` (a folded handle has no bridge)."""
    check = can_fold(mode if heads else None, handle, neuron_value=neuron_value, neurons=bool(neurons))
    if use_fold and check:
        folded = fold(handle, heads, mode=mode, gamma=gamma, mean_z=mean_z, neurons=neurons,
                      neuron_value=neuron_value)
        try:
            yield folded.handle, {"path": "folded", "reason": check.reason}
        finally:
            folded.free()
        return
    reason = check.reason if not check else "folding turned off (use_fold=False)"
    with contextlib.ExitStack() as stack:
        if heads:
            stack.enter_context(intervene(handle, heads, mode=mode, gamma=gamma, mean_z=mean_z))
        if neurons:
            stack.enter_context(ablate_neurons(handle, neurons, neuron_value))
        yield handle, {"path": "hooked", "reason": reason}
