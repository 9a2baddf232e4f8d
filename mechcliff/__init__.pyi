"""Type stub of the package root: the names that ``mechcliff/__init__.py`` exports lazily, each from its module.

Editors and type checkers read this file instead of the lazy ``__getattr__``. Keep it in step with ``_EXPORTS``
there: tests/test_public_api.py checks that both list the same names from the same modules.
"""

from mechcliff.model.loading import load_model as load_model
from mechcliff.model.handle import ModelHandle as ModelHandle
from mechcliff.model.conformance import check_conformance as check_conformance
from mechcliff.model.organism import build_organism as build_organism
from mechcliff.chat import encode as encode, EncodedBatch as EncodedBatch
from mechcliff.data import (
    Prompt as Prompt,
    Rollout as Rollout,
    load_prompts as load_prompts,
    load_rollouts as load_rollouts,
    save_rollouts as save_rollouts,
    builtin_prompts as builtin_prompts,
    split_thinking as split_thinking,
)
from mechcliff.generation import generate_rollouts as generate_rollouts, encode_rollouts as encode_rollouts
from mechcliff.generation import Sampling as Sampling
from mechcliff.probe import LinearProbe as LinearProbe, fit_probe as fit_probe
from mechcliff.trace import trace_refusal as trace_refusal, RefusalTrace as RefusalTrace
from mechcliff.attribution import (
    direct_probe_attribution as direct_probe_attribution,
    HeadAttribution as HeadAttribution,
    trace_positions as trace_positions,
)
from mechcliff.interventions import (
    intervene as intervene,
    head_label as head_label,
    parse_head as parse_head,
    mean_head_outputs as mean_head_outputs,
)
from mechcliff.patching import (
    patch_heads as patch_heads,
    patch_positions as patch_positions,
    ProbeMetric as ProbeMetric,
    LogitDiffMetric as LogitDiffMetric,
    RefusalLogOddsMetric as RefusalLogOddsMetric,
    PatchingResult as PatchingResult,
)
from mechcliff.sweep import ablation_sweep as ablation_sweep
from mechcliff.ships import ships_scores as ships_scores
from mechcliff.judges import get_judge as get_judge
from mechcliff.asr import ablation_experiment as ablation_experiment, asr_of as asr_of, probe_judge as probe_judge
from mechcliff.pipeline import run_pipeline as run_pipeline, RunConfig as RunConfig
from mechcliff.selection import (
    CandidatePool as CandidatePool,
    score_pool as score_pool,
    select as select,
    select_by_cliff as select_by_cliff,
    Selection as Selection,
)
from mechcliff.repair import (
    FinetuneConfig as FinetuneConfig,
    build_examples as build_examples,
    refusal_answer as refusal_answer,
    finetune as finetune,
)
from mechcliff.repair_curve import repair_curve as repair_curve, RepairCurve as RepairCurve
from mechcliff.figures import plot_run as plot_run, load_saved as load_saved
from mechcliff.plotting import apply_style as apply_style
from mechcliff.errors import MechcliffError as MechcliffError
from mechcliff.results import Result as Result
from mechcliff.safety_layers import SafetyLayers as SafetyLayers
from mechcliff.spectral import (
    spectral_head_metrics as spectral_head_metrics,
    SpectralHeadMetrics as SpectralHeadMetrics,
    head_jacobian_svd as head_jacobian_svd,
)
from mechcliff.modes import compare_modes as compare_modes, ModeComparison as ModeComparison
from mechcliff.refusal_heads import refusal_heads as refusal_heads, RefusalHeads as RefusalHeads
from mechcliff.neurons import (
    critical_neurons as critical_neurons,
    CriticalNeurons as CriticalNeurons,
    neuron_ablation as neuron_ablation,
    ablate_neurons as ablate_neurons,
    reciprocal_activation_shift as reciprocal_activation_shift,
    ras_series as ras_series,
    RASSeries as RASSeries,
)

__version__: str
__all__: list[str]


def __dir__() -> list[str]: ...
