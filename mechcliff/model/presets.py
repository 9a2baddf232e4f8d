"""Per-model defaults, in one table: how a model writes its thinking, and what a run, a repair curve and a
fine-tune default to on it. Any model that is not in the table gets :data:`DEFAULT`.

A new model preset is one entry of :data:`PRESETS` (docs/architecture.md): its think-format preset (a name of
:data:`mechcliff.model.handle.THINK_PRESETS`, used when a run says ``think_format="auto"``), the options of
:class:`mechcliff.pipeline.RunConfig` (``run``; ``run_quick`` with ``quick=True``) and of
:class:`mechcliff.repair_curve.RepairCurveConfig` (``repair_curve``) it changes, and the learning rate of a plain
``mechcliff repair``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

_LEARNED = ("harmless", "harmful", "harmful_jailbreak")


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """The defaults of one model (see the module docstring)."""

    think: str = "default"
    run: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    run_quick: Mapping[str, Any] | None = None  # None: the same as ``run``
    repair_curve: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    repair_lr: float = 1e-4

    def run_options(self, quick: bool) -> dict[str, Any]:
        """The :class:`~mechcliff.pipeline.RunConfig` options this model changes (fresh copies)."""
        chosen = self.run_quick if quick and self.run_quick is not None else self.run
        return {k: _copy(v) for k, v in chosen.items()}

    def repair_curve_options(self) -> dict[str, Any]:
        return {k: _copy(v) for k, v in self.repair_curve.items()}


def _copy(v: Any) -> Any:
    return dict(v) if isinstance(v, Mapping) else list(v) if isinstance(v, (list, tuple)) else v


#: Real models: ``quick`` runs 40 prompts per group with shorter generations and 2 random-head sets; a repair curve
#: runs fewer budgets and one seed, so that a CPU run stays within an hour.
DEFAULT = ModelPreset(
    run_quick={"n_per_group": 40, "max_think_tokens": 32, "max_answer_tokens": 24, "n_random_sets": 2},
    repair_curve={"finetune": {"lr": 1e-4}, "fractions": [0.05, 0.1, 0.25, 0.5], "seeds": 1, "n_per_group": 40},
)

PRESETS: dict[str, ModelPreset] = {
    # The hand-built organism: its own think format; 3 heads ablated (3% of its 32 heads would be one); its hand-set
    # weights are large, so fine-tuning uses lr 1e-2.
    "organism": ModelPreset(think="organism", run={"ablation_top_k": 3}, repair_curve={"finetune": {"lr": 1e-2}},
                            repair_lr=1e-2),
    # The learned refusal organism (mechcliff.learned_organism): its held-out prompts and jailbreak templates, 5
    # random-head sets; its LoRA was trained at 3e-4 for 330 steps, so a 30-step repair needs more (1e-3).
    "smollm2-refusal-organism": ModelPreset(
        run={"prompts": {g: f"heldout:{g}" for g in _LEARNED}, "n_random_sets": 5},
        repair_curve={**DEFAULT.repair_curve, "finetune": {"lr": 1e-3},
                      "attack": {g: f"heldout:{g}" for g in _LEARNED[1:]}, "harmless": "heldout:harmless"},
    ),
}


def preset(model: str) -> ModelPreset:
    """The defaults of ``model`` (a name of :data:`PRESETS`, else :data:`DEFAULT`)."""
    return PRESETS.get(model, DEFAULT)
