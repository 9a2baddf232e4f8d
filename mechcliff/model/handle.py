"""``ModelHandle``: the one type the rest of mechcliff sees.

It holds the TransformerLens ``TransformerBridge`` (which wraps the Hugging Face model in place, so hooks fire
for the bridge's own forward and for ``hf_model.generate`` alike), the tokenizer used for all encoding, the think
format, and the load-time conformance report. Analyses never touch backend details beyond what is here.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float

from mechcliff.errors import MechcliffError
from mechcliff.model.sites import site_of

if TYPE_CHECKING:
    from mechcliff.model.conformance import ConformanceReport


@dataclass
class ThinkFormat:
    """How thinking is written in this model's assistant turn.

    ``opener`` starts the thinking (unless the chat template's generation prompt already ends with it) and
    ``closer`` is the closing template, from the end of the thinking to the first answer token (``</think>``
    plus whatever the model writes before the answer). ``close_tag`` is what rollouts are split on and
    ``open_tag`` what marks a thinking the model opens (in the template's prompt, or inside its answer).

    A tag left empty is the first word of the opener / closer: ``ThinkFormat("<reasoning>\\n",
    "\\n</reasoning>\\n\\n")`` has the tags ``<reasoning>`` / ``</reasoning>``. Give the tags explicitly when a tag
    is several words. The opener must contain ``open_tag`` and the closer ``close_tag`` (a
    :class:`~mechcliff.errors.MechcliffError` otherwise), so what generation splits on is what encoding writes.
    """

    opener: str = "<think>\n"
    closer: str = "\n</think>\n\n"
    close_tag: str = ""
    open_tag: str = ""

    def __post_init__(self) -> None:
        for name in ("opener", "closer", "close_tag", "open_tag"):
            if not isinstance(getattr(self, name), str):
                raise MechcliffError(f"ThinkFormat.{name} must be a string, got {getattr(self, name)!r}")
        for name in ("opener", "closer"):
            if not getattr(self, name).strip():
                raise MechcliffError(f"ThinkFormat.{name} must contain its think tag, got {getattr(self, name)!r}")
        self.open_tag = self.open_tag or self.opener.split()[0]
        self.close_tag = self.close_tag or self.closer.split()[0]
        if self.open_tag not in self.opener:
            raise MechcliffError(f"ThinkFormat: open_tag {self.open_tag!r} is not in the opener {self.opener!r}")
        if self.close_tag not in self.closer:
            raise MechcliffError(f"ThinkFormat: close_tag {self.close_tag!r} is not in the closer {self.closer!r}")

    def to_dict(self) -> dict[str, str]:
        return {"opener": self.opener, "closer": self.closer, "close_tag": self.close_tag, "open_tag": self.open_tag}


# Think formats by name, for ``load_model(..., think=NAME)``. Only formats of the reasoning models studied in
# arXiv 2510.06036 (the models of its run scripts and figures) or read from a model's public chat template / system
# prompt; the source of each is given. Formats whose tags are the same share mechcliff's default strings
# ("<think>\n" + thinking + "\n</think>\n\n"); a template whose generation prompt already ends with the opener
# (R1 distills, QwQ, Qwen3-*-Thinking-2507) gets no second one (see mechcliff.chat.encode).
_DEFAULT = ThinkFormat()
THINK_PRESETS: dict[str, ThinkFormat] = {
    # mechcliff's default, for templates that do not mention thinking (e.g. SmolLM2's).
    "default": _DEFAULT,
    # arXiv 2510.06036: Qwen3-4B/30B-A3B-Thinking-2507 (and the hybrid Qwen3 models). Their chat template writes an
    # assistant turn as "<think>\n" + reasoning + "\n</think>\n\n" + answer, and "<think>\n\n</think>\n\n" when
    # enable_thinking=False.
    "qwen3": _DEFAULT,
    # arXiv 2510.06036: QwQ-32B. Same template strings as Qwen3; its generation prompt ends with "<think>\n".
    "qwq": _DEFAULT,
    # arXiv 2510.06036: DeepSeek-R1-Distill-Qwen-7B/14B, -Llama-8B, Skywork-OR1-7B and RealSafe-R1-7B/8B (R1
    # distills). The generation prompt ends with "<|Assistant|><think>\n" (full-width bars in the real token); the
    # paper's probe reads template + thinking + "\n</think>\n\n".
    "deepseek-r1": _DEFAULT,
    # arXiv 2510.06036: Phi-4-reasoning / Phi-4-mini-reasoning. Tags from Microsoft's recommended system prompt
    # ("... using the specified format: <think> {Thought section} </think> {Solution section}"); the whitespace
    # around them is not fixed by a template, so the default strings.
    "phi4-reasoning": _DEFAULT,
    # arXiv 2510.06036: Hermes-4-14B. Its chat template's thinking system prompt asks for "<think> </think> tags";
    # whitespace as for Phi-4-reasoning.
    "hermes4": _DEFAULT,
    # mechcliff's built-in organism (mechcliff.model.organism: word-level tokens, spaces around the tags).
    "organism": ThinkFormat(opener=" <think> ", closer=" </think> "),
    # Not a model of arXiv 2510.06036. Mistral's Magistral-Small-2509 and Ministral-3-*-Reasoning-2512: the default
    # system prompt's template "[THINK]Your thoughts ...[/THINK]Here, provide a self-contained response." (no
    # whitespace around the tags).
    "magistral": ThinkFormat(opener="[THINK]", closer="[/THINK]"),
    # Not a model of arXiv 2510.06036. ByteDance Seed-OSS-36B: "<seed:think>" ... "</seed:think>" (the tokens of
    # vLLM's SeedOSSReasoningParser).
    "seed-oss": ThinkFormat(opener="<seed:think>", closer="</seed:think>"),
}


def think_format(spec: "str | ThinkFormat | Mapping[str, str]") -> ThinkFormat:
    """A (new) :class:`ThinkFormat` from a preset name of :data:`THINK_PRESETS` (case and ``-``/``_`` insensitive),
    a ThinkFormat (copied) or a mapping of its fields (``{"opener": "<reasoning>\\n", "closer": ...}``). ``"auto"``
    is resolved by :func:`mechcliff.model.loading.load_model`, which knows the model."""
    import difflib

    if isinstance(spec, ThinkFormat):
        return dataclasses.replace(spec)
    if isinstance(spec, str):
        key = spec.strip().lower().replace("_", "-")
        if key in THINK_PRESETS:
            return dataclasses.replace(THINK_PRESETS[key])
        close = difflib.get_close_matches(key, list(THINK_PRESETS), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MechcliffError(f"unknown think format {spec!r}{hint}; use 'auto', one of {', '.join(THINK_PRESETS)}, "
                             "or a ThinkFormat / dict with opener and closer")
    if isinstance(spec, Mapping):
        names = {f.name for f in dataclasses.fields(ThinkFormat)}
        unknown = sorted(str(k) for k in spec if k not in names)
        if unknown:
            raise MechcliffError(f"unknown ThinkFormat field(s) {', '.join(map(repr, unknown))}; the fields are "
                                 f"{', '.join(sorted(names))}")
        if "opener" not in spec or "closer" not in spec:
            raise MechcliffError("a think format given as a dict needs 'opener' and 'closer'")
        return ThinkFormat(**dict(spec))
    raise MechcliffError(f"a think format is a preset name, a ThinkFormat or a dict, not {type(spec).__name__}")


def input_device(hf_model: Any) -> torch.device:
    """The device a forward's inputs go to: that of the input embedding's weights (for a model dispatched by
    accelerate, the embedding's execution device, where its inputs must be), else of the first parameter."""
    emb = None
    try:
        emb = hf_model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        pass
    if emb is not None:
        hook = getattr(emb, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        if execution is not None:
            return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
        weight = getattr(emb, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
            return weight.device
    for p in hf_model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def onloaded(module: torch.nn.Module) -> Iterator[None]:
    """Inside the block, the offloaded parameters of ``module`` and its submodules (accelerate's meta device) hold
    their values; a no-op for a model that is not offloaded."""
    try:
        from accelerate.utils import align_module_device, has_offloaded_params
    except ImportError:  # pragma: no cover - accelerate is a dependency
        yield
        return
    with contextlib.ExitStack() as stack:
        for m in module.modules():
            if has_offloaded_params(m):
                stack.enter_context(align_module_device(m))
        yield


@dataclass
class ModelHandle:
    """A loaded model: bridge, HF model, tokenizer, identity and conformance."""

    bridge: Any
    hf_model: Any
    tokenizer: Any
    model_id: str
    model_hash: str
    think: ThinkFormat = field(default_factory=ThinkFormat)
    exact_decomposition: bool = True
    conformance: "ConformanceReport | None" = None
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- shapes ----
    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def n_heads(self) -> int:
        return int(self.bridge.cfg.n_heads)

    @property
    def d_head(self) -> int:
        return int(self.bridge.cfg.d_head)

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)

    @property
    def n_ctx(self) -> int | None:
        """The model's context length in tokens: the Hugging Face config's ``max_position_embeddings`` (the forward
        that runs is the HF model's), else the bridge's ``cfg.n_ctx``; ``None`` when neither is known. Encoding
        refuses longer sequences and generation fits its budgets to it (:func:`mechcliff.chat.encode`,
        :func:`mechcliff.generation.generate_rollouts`)."""
        for v in (getattr(getattr(self.hf_model, "config", None), "max_position_embeddings", None),
                  getattr(getattr(self.bridge, "cfg", None), "n_ctx", None)):
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return None

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go: the device of its input embedding (:func:`input_device`)."""
        return input_device(self.hf_model)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights (and of the bridge's ``cfg.dtype``)."""
        return getattr(self.bridge.cfg, "dtype", None) or next(self.hf_model.parameters()).dtype

    @property
    def device_map(self) -> dict[str, str] | None:
        """Module -> device of a model placed by ``device_map`` (accelerate), else None."""
        dm = getattr(self.hf_model, "hf_device_map", None)
        return {str(k): str(v) for k, v in dm.items()} if dm else None

    def W_O(self, layer: int) -> Float[torch.Tensor, "head d_head d_model"]:
        """Per-head output weights of ``layer``: head ``h`` writes ``z[h] @ W_O[h]`` into the residual stream.

        On a model whose layer is offloaded (``device_map`` with ``"cpu"`` / ``"disk"`` entries), a copy read from
        the offload storage, on the layer's execution device."""
        attn = self.bridge.blocks[layer].attn
        with onloaded(attn):
            return attn.W_O.detach().clone() if self.device_map else attn.W_O.detach()

    def b_O(self, layer: int) -> Float[torch.Tensor, " d_model"]:
        """Output bias of ``layer``'s attention (zeros when the architecture has none)."""
        attn = self.bridge.blocks[layer].attn
        with onloaded(attn):
            b = getattr(attn, "b_O", None)
            if b is None:
                return torch.zeros(self.d_model, device=self.device, dtype=self.dtype)
            return b.detach().clone() if self.device_map else b.detach()

    def check_layer(self, layer: int) -> int:
        """Validate a layer index (negative counts from the end); raises a clear error when out of range."""
        if not isinstance(layer, int):
            raise MechcliffError(f"layer must be an integer, got {layer!r}")
        if not -self.n_layers <= layer < self.n_layers:
            raise MechcliffError(
                f"layer {layer} is out of range: {self.model_id} has {self.n_layers} layers (0..{self.n_layers - 1})"
            )
        return layer % self.n_layers

    @property
    def ground_truth(self) -> Any:
        """The organism's planted circuit (:class:`~mechcliff.model.organism.OrganismGroundTruth`), else None."""
        return self.extra.get("ground_truth")

    def head_labels(self) -> list[str]:
        return [f"L{l}H{h}" for l in range(self.n_layers) for h in range(self.n_heads)]

    def describe(self) -> dict[str, Any]:
        """Identity and shape, for manifests and result provenance."""
        return {
            "model_id": self.model_id,
            "model_hash": self.model_hash,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "d_head": self.d_head,
            "d_model": self.d_model,
            "architecture": type(self.hf_model).__name__,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "device_map": self.device_map,
            "exact_decomposition": self.exact_decomposition,
            "conformance_checked": self.conformance is not None,
            # the sites read on the plain HF model (mechcliff.model.plain), as verified at load, and its attention
            "plain_reads": sorted({site_of(n) for n in self.extra.get("plain_sites", ())}),
            "plain_attention": self.extra.get("plain_attention"),
            "think_format": {"preset": self.extra.get("think_format", "auto"), **self.think.to_dict()},
            **({"adapter": self.extra["adapter"]} if "adapter" in self.extra else {}),
        }

    def __repr__(self) -> str:
        return (
            f"ModelHandle({self.model_id!r}, {type(self.hf_model).__name__}, layers={self.n_layers}, "
            f"heads={self.n_heads}, d_model={self.d_model}, exact_decomposition={self.exact_decomposition})"
        )
