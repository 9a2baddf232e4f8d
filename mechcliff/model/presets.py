"""Per-model defaults, in one table: how a model writes its thinking, and what a run, a repair curve and a
fine-tune default to on it. Any model that is not in the table gets :data:`DEFAULT`.

A new model preset is one entry of :data:`PRESETS` (docs/architecture.md): its think-format preset (a name of
:data:`mechcliff.model.handle.THINK_PRESETS`, used when a run says ``think_format="auto"``), the options of
:class:`mechcliff.pipeline.RunConfig` (``run``; ``run_quick`` with ``quick=True``) and of
:class:`mechcliff.repair_curve.RepairCurveConfig` (``repair_curve``) it changes, the token budgets
:func:`mechcliff.generation.generate_rollouts` defaults to on it (``budgets``), and the learning rate of a plain
``mechcliff repair``.

**Token budgets.** Real reasoning models think for hundreds to thousands of tokens; a budget that closes their
thinking early ("budget forcing") changes the very behaviour the refusal cliff is about. So any model not in the
table (:data:`DEFAULT`) gets reasoning-scale budgets: 4,096 thinking and 512 answer tokens, in a full
``mechcliff run`` and in ``generate_rollouts``. A ``quick`` run keeps 32 / 24 (a smoke test on a CPU, not a
measurement). The two organisms, whose thinking is a few dozen tokens, keep their short budgets (run: 48 / 32,
``RunConfig``'s own defaults; ``generate_rollouts``: 64 / 48), so their results are unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

_LEARNED = ("harmless", "harmful", "harmful_jailbreak")
#: ``generate_rollouts``'s budgets on the organisms (its defaults before real models got reasoning-scale ones)
ORGANISM_BUDGETS = (64, 48)
#: The other papers' studies keep their own short budgets on the organisms (``generation_budgets(..., short=)``):
#: compare-modes, refusal heads, neurons and RAS ("When Thinking Backfires") ...
STUDY_BUDGETS = (48, 32)
#: ... and the CoT studies, safety layers and spectral metrics ("CoT is Not the Chain of Truth").
COT_BUDGETS = (64, 16)


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """The defaults of one model (see the module docstring)."""

    think: str = "default"
    run: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    run_quick: Mapping[str, Any] | None = None  # None: the same as ``run``
    repair_curve: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    repair_lr: float = 1e-4
    # (max_think_tokens, max_answer_tokens) of generate_rollouts when its caller gives none
    budgets: tuple[int, int] = (4096, 512)

    def run_options(self, quick: bool) -> dict[str, Any]:
        """The :class:`~mechcliff.pipeline.RunConfig` options this model changes (fresh copies)."""
        chosen = self.run_quick if quick and self.run_quick is not None else self.run
        return {k: _copy(v) for k, v in chosen.items()}

    def repair_curve_options(self) -> dict[str, Any]:
        return {k: _copy(v) for k, v in self.repair_curve.items()}


def _copy(v: Any) -> Any:
    return dict(v) if isinstance(v, Mapping) else list(v) if isinstance(v, (list, tuple)) else v


#: Real models: reasoning-scale token budgets (4,096 thinking, 512 answer; the module docstring says why); ``quick``
#: runs 40 prompts per group with short generations (32 / 24 tokens) and 2 random-head sets; a repair curve runs fewer
#: budgets and one seed, so that a CPU run stays within an hour.
DEFAULT = ModelPreset(
    run={"max_think_tokens": 4096, "max_answer_tokens": 512},
    run_quick={"n_per_group": 40, "max_think_tokens": 32, "max_answer_tokens": 24, "n_random_sets": 2},
    repair_curve={"finetune": {"lr": 1e-4}, "fractions": [0.05, 0.1, 0.25, 0.5], "seeds": 1, "n_per_group": 40},
)

PRESETS: dict[str, ModelPreset] = {
    # The hand-built organism: its own think format; 3 heads ablated (3% of its 32 heads would be one); its hand-set
    # weights are large, so fine-tuning uses lr 1e-2. Its thinking is a few dozen tokens: short budgets (run 48 / 32).
    "organism": ModelPreset(think="organism", run={"ablation_top_k": 3}, repair_curve={"finetune": {"lr": 1e-2}},
                            repair_lr=1e-2, budgets=ORGANISM_BUDGETS),
    # The learned refusal organism (mechcliff.learned_organism): its held-out prompts and jailbreak templates, 5
    # random-head sets; its LoRA was trained at 3e-4 for 330 steps, so a 30-step repair needs more (1e-3). It was
    # trained on short thinking (tens of tokens): short budgets (run 48 / 32, its study's).
    "smollm2-refusal-organism": ModelPreset(
        run={"prompts": {g: f"heldout:{g}" for g in _LEARNED}, "n_random_sets": 5}, budgets=ORGANISM_BUDGETS,
        repair_curve={**DEFAULT.repair_curve, "finetune": {"lr": 1e-3},
                      "attack": {g: f"heldout:{g}" for g in _LEARNED[1:]}, "harmless": "heldout:harmless"},
    ),
}


def preset(model: str) -> ModelPreset:
    """The defaults of ``model`` (a name of :data:`PRESETS`, else :data:`DEFAULT`)."""
    return PRESETS.get(model, DEFAULT)


def generation_budgets(model: Any, max_think_tokens: int | None = None,
                       max_answer_tokens: int | None = None, *, short: tuple[int, int] | None = None) -> tuple[int, int]:
    """``(max_think_tokens, max_answer_tokens)``: the given ones, a ``None`` replaced by the budget of ``model``'s
    preset (``ModelPreset.budgets``: 64 / 48 on the organisms, 4,096 / 512 on any other model; ``short``: a study's
    own short budgets, used instead of the preset's on a model with short ones, so that its organism results stay
    as they were). ``model`` is a model name or a loaded model (its ``model_id``; a copy with heads folded into its
    weights, :mod:`mechcliff.folding`, has the budgets of the model it was folded from)."""
    if model is not None and not isinstance(model, str):
        folded = (getattr(model, "extra", None) or {}).get("folded") or {}
        model = folded.get("source_model") or getattr(model, "model_id", None)
    think, answer = preset(model if isinstance(model, str) else "").budgets
    if short is not None and (think, answer) != DEFAULT.budgets:
        think, answer = short
    return (think if max_think_tokens is None else max_think_tokens,
            answer if max_answer_tokens is None else max_answer_tokens)
