"""``ModelHandle``: the one type the rest of mechcliff sees.

It holds the TransformerLens ``TransformerBridge`` (which wraps the Hugging Face model in place, so hooks fire
for the bridge's own forward and for ``hf_model.generate`` alike), the tokenizer used for all encoding, the think
format, and the load-time conformance report. Analyses never touch backend details beyond what is here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float

if TYPE_CHECKING:
    from mechcliff.model.conformance import ConformanceReport


@dataclass
class ThinkFormat:
    """How thinking is written in this model's assistant turn.

    ``opener`` starts the thinking (unless the chat template's generation prompt already ends with it) and
    ``closer`` is the closing template, from the end of the thinking to the first answer token (``</think>``
    plus whatever the model writes before the answer). ``close_tag`` is what rollouts are split on.
    """

    opener: str = "<think>\n"
    closer: str = "\n</think>\n\n"
    close_tag: str = "</think>"
    open_tag: str = "<think>"


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
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    def W_O(self, layer: int) -> Float[torch.Tensor, "head d_head d_model"]:
        """Per-head output weights of ``layer``: head ``h`` writes ``z[h] @ W_O[h]`` into the residual stream."""
        return self.bridge.blocks[layer].attn.W_O.detach()

    def b_O(self, layer: int) -> Float[torch.Tensor, " d_model"]:
        """Output bias of ``layer``'s attention (zeros when the architecture has none)."""
        b = getattr(self.bridge.blocks[layer].attn, "b_O", None)
        if b is None:
            return torch.zeros(self.d_model, device=self.device)
        return b.detach()

    def check_layer(self, layer: int) -> int:
        """Validate a layer index (negative counts from the end); raises a clear error when out of range."""
        from mechcliff.errors import MechcliffError

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
            "exact_decomposition": self.exact_decomposition,
            "conformance_checked": self.conformance is not None,
            **({"adapter": self.extra["adapter"]} if "adapter" in self.extra else {}),
        }

    def __repr__(self) -> str:
        return (
            f"ModelHandle({self.model_id!r}, {type(self.hf_model).__name__}, layers={self.n_layers}, "
            f"heads={self.n_heads}, d_model={self.d_model}, exact_decomposition={self.exact_decomposition})"
        )
