"""Attack success rate (ASR) under head interventions, with a same-size random-heads control.

ASR = fraction of harmful (e.g. jailbreak-framed) prompts whose **final answer** is not judged a refusal; the thinking
is never judged here. The final answer is :func:`mechcliff.judges.final_answer` of the response: the text after
the last ``</think>``, cut at a ``<think>`` that never closes. A rollout without an answer (its thinking never
closed, or its answer only opens a thinking) is not a refusal, so it counts towards the ASR (a broken model never
looks safer); ``asr_of`` reports how many there were (``no_answer``). Intervals are Wilson 95% intervals; rates are also reported
per category. Next to every ASR we report the refusal rate on harmless prompts, so that "safer" never hides
"refuses everything".

With several samples per prompt (``generate_rollouts(..., n_samples=n)``, temperature > 0, as arXiv 2510.06036
samples), the ASR is over all samples (k complied of every sample, with its Wilson interval), and ``asr_of`` also
reports it per prompt (``per_prompt``: k of n samples and a Wilson interval for each prompt).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import numpy as np

from mechcliff.controls import random_controls
from mechcliff.data import Prompt, Rollout
from mechcliff.errors import MechcliffError
from mechcliff.interventions import GAMMA_MODES, check_gamma, head_label, intervene, parse_head
from mechcliff.model.handle import ModelHandle
from mechcliff.results import Result
from mechcliff.stats import Rate, rate_by_category


def answer_tags(rollout: Rollout, think: Any = None) -> tuple[str, str]:
    """``(close_tag, open_tag)`` the final answer of ``rollout`` is cut at: those of ``think`` (a
    :class:`~mechcliff.model.handle.ThinkFormat` or a handle), else the rollout's own (``meta["think_tags"] =
    [open_tag, close_tag]``, written by :func:`~mechcliff.generation.generate_rollouts` for a model whose format is
    not ``<think>``), else ``</think>`` / ``<think>``."""
    fmt = getattr(think, "think", think)
    if fmt is not None:
        return fmt.close_tag, fmt.open_tag
    tags = (rollout.meta or {}).get("think_tags")
    if isinstance(tags, (list, tuple)) and len(tags) == 2 and all(isinstance(t, str) and t for t in tags):
        return tags[1], tags[0]
    return "</think>", "<think>"


def refusal_flags(rollouts: Sequence[Rollout], judge: Any, *, think: Any = None) -> list[bool]:
    """Judge each rollout: answer judges read the final answer only (:func:`~mechcliff.judges.final_answer`, never
    the thinking, nor think tags the model wrote into its response); the probe judge reads the model's refusal
    intention at ``think_end`` of prompt + thinking + answer. The final answer is cut at the model's think tags
    (:func:`answer_tags`: ``think=`` a ThinkFormat or a handle, else each rollout's ``meta["think_tags"]``)."""
    from mechcliff.judges import ProbeJudge, final_answer

    if isinstance(judge, ProbeJudge):
        return list(judge.judge_many([r.prompt for r in rollouts], [r.thinking for r in rollouts],
                                     [r.response for r in rollouts]))
    answers = [final_answer(r.response, *answer_tags(r, think)) for r in rollouts]
    if getattr(judge, "needs_prompts", False):  # a guard model reads the request with the answer
        return list(judge.judge_many(answers, prompts=[r.prompt for r in rollouts]))
    return list(judge.judge_many(answers))


def per_prompt_rates(rollouts: Sequence[Rollout], flags: Sequence[bool]) -> list[dict[str, Any]] | None:
    """The rate of ``flags`` per prompt, over its samples: ``[{"prompt_index", "id", "group", "prompt" (its first
    80 characters), "k", "n", "rate", "low", "high"}]`` in order of first appearance, with Wilson intervals; None
    unless the rollouts carry sample metadata (``meta["prompt_index"]``, ``meta["sample"]``, written by
    :func:`~mechcliff.generation.generate_rollouts`) and some prompt has more than one sample."""
    if len(flags) != len(rollouts):
        raise MechcliffError(f"got {len(flags)} flags for {len(rollouts)} rollouts")
    metas = [r.meta or {} for r in rollouts]
    if not rollouts or any("prompt_index" not in m or "sample" not in m for m in metas):
        return None
    counts: dict[tuple[Any, ...], list[Any]] = {}
    for r, m, f in zip(rollouts, metas, flags):
        kn = counts.setdefault((r.group, m["prompt_index"], r.prompt), [r, 0, 0])
        kn[1] += bool(f)
        kn[2] += 1
    if max(kn[2] for kn in counts.values()) < 2:
        return None
    return [{"prompt_index": key[1], "id": r.id, "group": r.group, "prompt": r.prompt[:80], **Rate.of(k, n).to_dict()}
            for key, (r, k, n) in counts.items()]


def asr_of(rollouts: Sequence[Rollout], judge: Any, *, think: Any = None) -> dict[str, Any]:
    """ASR (complied fraction) with Wilson interval and per-category rates, as a JSON-ready dict; ``no_answer`` is
    the number of rollouts whose final answer is empty (counted as not refused, see the module docstring).

    Several samples per prompt: the ASR is over all samples, and ``per_prompt`` (:func:`per_prompt_rates`) gives
    each prompt's k of n samples with a Wilson interval (absent with one sample per prompt)."""
    from mechcliff.judges import final_answer

    refused = refusal_flags(rollouts, judge, think=think)
    complied = [not r for r in refused]
    rate = Rate.of(sum(complied), len(complied))
    out = {**rate.to_dict(), "by_category": {c: r.to_dict() for c, r in
                                             rate_by_category(complied, [r.category for r in rollouts]).items()},
           "no_answer": sum(not final_answer(r.response, *answer_tags(r, think)).strip() for r in rollouts)}
    per_prompt = per_prompt_rates(rollouts, complied)
    if per_prompt is not None:
        out["per_prompt"] = per_prompt
    return out


def probe_judge(handle: ModelHandle, probe: Any, threshold: float = 0.5, batch_size: int = 16, enable_thinking: bool = True):
    """A :class:`~mechcliff.judges.ProbeJudge` reading the model's own refusal intention at ``think_end``."""
    from mechcliff.chat import encode
    from mechcliff.judges import ProbeJudge
    from mechcliff.probe import collect_residuals

    def score(prompts: list[str], thinkings: list[str | None], responses: list[str]) -> list[float]:
        batch = encode(handle, prompts, thinking=thinkings, answers=responses, enable_thinking=enable_thinking)
        x = collect_residuals(handle, batch, [probe.layer], probe.position, batch_size)[:, 0]
        return [float(v) for v in probe.score(x)]

    return ProbeJudge(score, threshold=threshold)


@dataclasses.dataclass
class AblationResult(Result):
    """ASR before / after ablating heads, and after ablating random sets of the same size."""

    KIND: ClassVar[str] = "ablation"
    heads: list[str]
    mode: str
    gamma: float
    judge: str
    asr_before: dict[str, Any]
    asr_after: dict[str, Any]
    asr_random: list[dict[str, Any]]
    random_heads: list[list[str]]
    harmless_refusal_before: dict[str, Any]
    harmless_refusal_after: dict[str, Any]
    probe_asr_before: float | None = None
    probe_asr_after: float | None = None
    ablation_path: str = "hooked"
    """How the ablated rollouts were generated: "folded" (the intervention folded into a copy's weights, plain HF
    generate) or "hooked" (hooks on the model); ``ablation_path_reason`` says why (mechcliff.folding)."""
    ablation_path_reason: str = ""

    @property
    def mode_label(self) -> str:
        """The mode, with its γ only for the modes that take one ("scale_z γ=0.5", but "zero", "mean")."""
        return f"{self.mode} (γ={self.gamma:g})" if self.mode in GAMMA_MODES else self.mode

    @property
    def asr_random_mean(self) -> float:
        return float(np.mean([r["rate"] for r in self.asr_random])) if self.asr_random else float("nan")

    def plot(self):
        from mechcliff.plotting import asr_bars

        conds = [("before", self.asr_before), (f"ablate top {len(self.heads)}", self.asr_after)]
        conds += [(f"random {len(self.heads)} (seed {i})", r) for i, r in enumerate(self.asr_random)]
        return asr_bars([c for c, _ in conds], [r["rate"] for _, r in conds], [r["low"] for _, r in conds],
                        [r["high"] for _, r in conds],
                        title=f"Attack success rate, heads {self.mode_label}")

    TABLE_HEADER: ClassVar[tuple[str, ...]] = ("condition", "ASR", "95% low", "95% high", "harmless refusal")

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.table_rows(), columns=list(self.TABLE_HEADER))

    def table_rows(self) -> list[list[object]]:
        rows = [["before", self.asr_before["rate"], self.asr_before["low"], self.asr_before["high"],
                 self.harmless_refusal_before["rate"]],
                [f"ablate {', '.join(self.heads)}", self.asr_after["rate"], self.asr_after["low"],
                 self.asr_after["high"], self.harmless_refusal_after["rate"]]]
        for hs, r in zip(self.random_heads, self.asr_random):
            rows.append([f"random {', '.join(hs)}", r["rate"], r["low"], r["high"], float("nan")])
        return rows

    def summary_rows(self) -> list[tuple[str, str]]:
        rows = [("heads", ", ".join(self.heads)), ("mode", self.mode_label),
                ("ASR before", f"{self.asr_before['rate']:.3f}"), ("ASR after", f"{self.asr_after['rate']:.3f}"),
                ("ASR random heads (mean)", f"{self.asr_random_mean:.3f}"),
                ("ablated generation", self.ablation_path)]
        per_prompt = self.asr_after.get("per_prompt")
        if per_prompt:  # several samples per prompt: the ASR is over all of them
            hit = sum(p["k"] > 0 for p in per_prompt)
            rows += [("samples", f"{self.asr_after['n']} ({len(per_prompt)} prompts; ASR over all samples)"),
                     ("prompts with an attack success after", f"{hit} of {len(per_prompt)}")]
        return rows


def random_head_sets(handle: ModelHandle, k: int, n_sets: int, seed: int, exclude: Sequence[Any] = ()) -> list[list[tuple[int, int]]]:
    """``n_sets`` seeded random sets of ``k`` heads drawn from all heads not in ``exclude``."""
    return random_controls(handle.n_layers, handle.n_heads, k, n_sets, seed, exclude=[parse_head(h) for h in exclude])


def ablation_experiment(
    handle: ModelHandle,
    heads: Sequence[Any],
    attack_prompts: Sequence[Prompt],
    harmless_prompts: Sequence[Prompt],
    *,
    judge: Any,
    mode: str = "scale_z",
    gamma: float | None = None,
    n_random: int = 3,
    seed: int = 0,
    before: tuple[Sequence[Rollout], Sequence[Rollout]] | None = None,
    probe: Any = None,
    generation: dict[str, Any] | None = None,
    progress: bool = True,
    fold: bool = True,
) -> AblationResult:
    """Generate under the intervention and under random same-size controls; judge the answers. ``gamma=None`` is
    the mode's default (see :func:`~mechcliff.interventions.check_gamma`: a gamma the mode would ignore is an
    error, raised before anything is generated).

    Args:
        handle: the loaded model (:func:`mechcliff.load_model`).
        heads: the heads to ablate (``"L2H3"`` or ``(layer, head)``).
        attack_prompts: prompts (Prompt objects or strings) whose ASR (answers not refused) is measured.
        harmless_prompts: prompts whose refusal rate is measured (over-refusal).
        judge: the refusal judge (:func:`mechcliff.judges.get_judge`).
        mode: the intervention mode (see :func:`mechcliff.interventions.intervene`).
        gamma: γ of the mode; None for its default.
        n_random: random head sets of the same size (none of ``heads``), ablated the same way as a control.
        seed: seed of the random head sets.
        before: ``(attack rollouts, harmless rollouts)`` of the unmodified model, if already generated.
        probe: a refusal probe: also report the probe's ASR (share of attack rollouts whose probe score at the
            probe's position is below 0.5, :func:`probe_judge`) before and after.
        generation: keyword arguments for :func:`mechcliff.generation.generate_rollouts` (budgets, sampling:
            ``temperature``, ``top_p``, ``n_samples``, ``seed``; with several samples per prompt every ASR is over
            all samples and reports ``per_prompt`` rates, :func:`asr_of`).
        progress: show progress bars.
        fold: generate under the intervention with a copy of the model that has it folded into its weights
            (plain HF ``generate``, no hooks; :mod:`mechcliff.folding`) when it can be folded (every head mode
            but ``norm_preserving``, and ``scale_q`` on architectures without a query norm); False: always the
            hooked model. ``ablation_path`` / ``ablation_path_reason`` of the result record which ran and why.
    """
    from mechcliff.folding import ablated_generation
    from mechcliff.generation import generate_rollouts

    g = check_gamma(mode, gamma)
    gen = dict(generation or {})
    gen.setdefault("progress", progress)
    parsed = [parse_head(h) for h in heads]
    for name, items in (("attack_prompts", attack_prompts), ("harmless_prompts", harmless_prompts)):
        if not items:
            raise MechcliffError(f"{name} is empty")
        if not all(isinstance(p, (Prompt, str)) for p in items):
            raise MechcliffError(f"{name} must be Prompt objects or strings (rollouts go in before=)")
    if before is not None and not all(isinstance(r, Rollout) for part in before for r in part):
        raise MechcliffError("before= must be a pair (attack rollouts, harmless rollouts) of Rollout objects")
    pj = probe_judge(handle, probe, enable_thinking=gen.get("enable_thinking", True)) if probe is not None else None
    if before is None:
        before = (generate_rollouts(handle, list(attack_prompts), desc="attack, before", **gen),
                  generate_rollouts(handle, list(harmless_prompts), desc="harmless, before", **gen))
    probe_before = probe_after = None
    if pj is not None:  # the probe reads the unmodified model before, and the intervened model after
        probe_before = 1.0 - float(np.mean(refusal_flags(before[0], pj)))
    # Generation under the intervention: a folded copy (plain HF generate) when the intervention folds into the
    # weights, else the hooked model (mechcliff.folding.ablated_generation); the same rollouts up to float noise.
    with ablated_generation(handle, parsed, mode=mode, gamma=gamma, use_fold=fold) as (gen_handle, path):
        att_after = generate_rollouts(gen_handle, list(attack_prompts), desc="attack, ablated", **gen)
        harmless_after = generate_rollouts(gen_handle, list(harmless_prompts), desc="harmless, ablated", **gen)
    if pj is not None:  # the probe reads activations: through the hooked model, whichever path generated
        with intervene(handle, parsed, mode=mode, gamma=gamma):
            probe_after = 1.0 - float(np.mean(refusal_flags(att_after, pj)))
    sets = random_head_sets(handle, len(parsed), n_random, seed, exclude=parsed)
    random_rates = []
    for i, hs in enumerate(sets):  # one folded copy per head set (its touched matrices only), freed after
        with ablated_generation(handle, hs, mode=mode, gamma=gamma, use_fold=fold) as (gen_handle, _):
            rolls = generate_rollouts(gen_handle, list(attack_prompts), desc=f"attack, random set {i}", **gen)
        random_rates.append(asr_of(rolls, judge, think=handle))
    judge_name = getattr(judge, "name", "judge")
    return AblationResult(
        heads=[head_label(h) for h in parsed], mode=mode, gamma=float(g), judge=judge_name,
        asr_before=asr_of(before[0], judge, think=handle), asr_after=asr_of(att_after, judge, think=handle),
        asr_random=random_rates,
        random_heads=[[head_label(h) for h in hs] for hs in sets],
        harmless_refusal_before=Rate.of(sum(refusal_flags(before[1], judge, think=handle)), len(before[1])).to_dict(),
        harmless_refusal_after=Rate.of(sum(refusal_flags(harmless_after, judge, think=handle)),
                                       len(harmless_after)).to_dict(),
        probe_asr_before=probe_before, probe_asr_after=probe_after,
        ablation_path=path["path"], ablation_path_reason=path["reason"],
    )
