"""mechcliff: mechanistic interpretability of safety in reasoning language models.

Implements "Refusal Falls off a Cliff" (arXiv 2510.06036): refusal probe, per-token refusal trace and cliff
statistics, direct probe attribution of attention heads, head interventions and attack success rate, on
TransformerLens 4 (``TransformerBridge``). Imports are lazy so that ``import mechcliff`` is fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from mechcliff.versions import __version__  # the one place the version is written (besides pyproject.toml)

_EXPORTS = {
    "load_model": "mechcliff.model.loading",
    "ModelHandle": "mechcliff.model.handle",
    "check_conformance": "mechcliff.model.conformance",
    "build_organism": "mechcliff.model.organism",
    "encode": "mechcliff.chat",
    "EncodedBatch": "mechcliff.chat",
    "Prompt": "mechcliff.data",
    "Rollout": "mechcliff.data",
    "load_prompts": "mechcliff.data",
    "load_rollouts": "mechcliff.data",
    "save_rollouts": "mechcliff.data",
    "builtin_prompts": "mechcliff.data",
    "split_thinking": "mechcliff.data",
    "generate_rollouts": "mechcliff.generation",
    "encode_rollouts": "mechcliff.generation",
    "Sampling": "mechcliff.generation",
    "LinearProbe": "mechcliff.probe",
    "fit_probe": "mechcliff.probe",
    "trace_refusal": "mechcliff.trace",
    "RefusalTrace": "mechcliff.trace",
    "direct_probe_attribution": "mechcliff.attribution",
    "HeadAttribution": "mechcliff.attribution",
    "trace_positions": "mechcliff.attribution",
    "intervene": "mechcliff.interventions",
    "head_label": "mechcliff.interventions",
    "parse_head": "mechcliff.interventions",
    "mean_head_outputs": "mechcliff.interventions",
    "patch_heads": "mechcliff.patching",
    "patch_positions": "mechcliff.patching",
    "ProbeMetric": "mechcliff.patching",
    "LogitDiffMetric": "mechcliff.patching",
    "RefusalLogOddsMetric": "mechcliff.patching",
    "PatchingResult": "mechcliff.patching",
    "ablation_sweep": "mechcliff.sweep",
    "ships_scores": "mechcliff.ships",
    "get_judge": "mechcliff.judges",
    "ablation_experiment": "mechcliff.asr",
    "asr_of": "mechcliff.asr",
    "probe_judge": "mechcliff.asr",
    "run_pipeline": "mechcliff.pipeline",
    "RunConfig": "mechcliff.pipeline",
    "CandidatePool": "mechcliff.selection",
    "score_pool": "mechcliff.selection",
    "select": "mechcliff.selection",
    "select_by_cliff": "mechcliff.selection",
    "Selection": "mechcliff.selection",
    "FinetuneConfig": "mechcliff.repair",
    "build_examples": "mechcliff.repair",
    "refusal_answer": "mechcliff.repair",
    "finetune": "mechcliff.repair",
    "repair_curve": "mechcliff.repair_curve",
    "RepairCurve": "mechcliff.repair_curve",
    "plot_run": "mechcliff.figures",
    "load_saved": "mechcliff.figures",
    "apply_style": "mechcliff.plotting",
    "MechcliffError": "mechcliff.errors",
    "Result": "mechcliff.results",
    "SafetyLayers": "mechcliff.safety_layers",
    "spectral_head_metrics": "mechcliff.spectral",
    "SpectralHeadMetrics": "mechcliff.spectral",
    "head_jacobian_svd": "mechcliff.spectral",
    "compare_modes": "mechcliff.modes",
    "ModeComparison": "mechcliff.modes",
    "refusal_heads": "mechcliff.refusal_heads",
    "RefusalHeads": "mechcliff.refusal_heads",
    "critical_neurons": "mechcliff.neurons",
    "CriticalNeurons": "mechcliff.neurons",
    "neuron_ablation": "mechcliff.neurons",
    "ablate_neurons": "mechcliff.neurons",
    "reciprocal_activation_shift": "mechcliff.neurons",
    "ras_series": "mechcliff.neurons",
    "RASSeries": "mechcliff.neurons",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

# Editors and type checkers read mechcliff/__init__.pyi, which imports every name above from its module; keep the two
# in step (tests/test_public_api.py checks they list the same names and that each resolves).


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mechcliff' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names (lazy exports included, so that completion offers them) and the module's own dunders."""
    return sorted(set(__all__) | {k for k in globals() if k.startswith("__") and k.endswith("__")})
