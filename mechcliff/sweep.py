"""Ablation sweeps: top-k heads × γ × mode, each cell with ASR, a same-size random control and a capability check.

Each cell generates the attack prompts and the harmless prompts under the intervention, judges the final answers,
and measures capability on harmless text so that "safer" never hides "broken":

* ``loss``: mean next-token cross-entropy of the model on its own harmless continuations (thinking, closing
  template and answer of unablated harmless rollouts), under the intervention;
* ``kl``: mean KL(base ‖ intervened) of the next-token distribution at the end of the harmless generation prompts.

Cells are appended to ``out_dir/cells.jsonl`` as they finish; a re-run skips the cells already there (resumable).

**What makes a cached cell reusable.** Every line of ``cells.jsonl`` records the *experiment* that produced it
(:func:`sweep_experiment`): the model's weights fingerprint (``handle.model_hash``), its adapter
(``handle.extra["adapter"]``) and chat template; content hashes of the attack prompt texts, the harmless prompt
texts and the harmless rollouts the capability loss is measured on; the judge (name, version, and a hash of its
``describe()``); the generation settings (the ``generation`` dict with ``generate_rollouts``'s defaults filled in,
display-only keys ``progress`` and ``desc`` left out) and the sweep's ``seed``; and, for the cell itself, mode, γ,
k, selection, seed index and the exact heads. A cell is reused only when all of these are equal.

*Cells of another experiment are kept, not reused, not deleted*: they stay in the file (a folder can hold several
experiments), are ignored, and the cell is recomputed and appended; a :class:`UserWarning` says how many lines were
ignored and which parts of the experiment differ. Lines written before cells carried their experiment (no
``experiment`` field) are treated the same way. Only a half-written last line (no newline: the run was killed
mid-write) is cut off, since the next cell is appended after it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import warnings
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from mechcliff.chat import EncodedBatch, encode
from mechcliff.data import Prompt, Rollout, content_hash
from mechcliff.errors import MechcliffError
from mechcliff.interventions import head_label, intervene, parse_head
from mechcliff.model.capture import MAX_TOKENS, capture, forward
from mechcliff.model.handle import ModelHandle
from mechcliff.results import Result


@torch.no_grad()
def continuation_loss(handle: ModelHandle, batch: EncodedBatch, batch_size: int = 16,
                      max_tokens: int | None = MAX_TOKENS, positions_per_step: int = 1024) -> float:
    """Mean cross-entropy (nats/token) of the tokens after the generation prompt (thinking, closing, answer).

    Only the target tokens' log-probabilities are formed, ``positions_per_step`` positions at a time, in float64
    (``x_t - logsumexp(x)``): never a float64 copy of the ``[batch, pos, vocab]`` logits."""
    total, count = 0.0, 0
    for chunk in capture(handle, batch, {}, batch_size=batch_size, max_tokens=max_tokens, return_logits=True):
        idx, logits = chunk.where.index, chunk.logits
        assert logits is not None  # return_logits=True
        toks, mask = batch.tokens[idx], chunk.where.attention_mask
        keep = torch.zeros_like(toks, dtype=torch.bool)
        for j, i in enumerate(idx.tolist()):
            keep[j, batch.spans[i]["prefix"][1]:] = True
        keep = keep[:, 1:] & mask[:, 1:].bool()  # position t predicts token t + 1
        for j in range(len(idx)):
            where = keep[j].nonzero().flatten()
            for s in range(0, len(where), positions_per_step):
                p = where[s:s + positions_per_step].to(logits.device)
                x = logits[j, p].double()  # [positions, vocab]
                target = x.gather(-1, toks[j, 1:].to(logits.device)[p][:, None])[:, 0]
                total -= float((target - torch.logsumexp(x, -1)).sum())
            count += len(where)
    if count == 0:
        raise MechcliffError("no continuation tokens to score (harmless rollouts without thinking or answers)")
    return total / count


@torch.no_grad()
def next_token_logprobs(handle: ModelHandle, batch: EncodedBatch, position: Any = "prompt_end") -> torch.Tensor:
    pos = batch.position(position)
    logits = forward(handle, batch.tokens, batch.attention_mask)
    return torch.log_softmax(logits[torch.arange(len(batch)), pos].double(), -1)


def mean_kl(base_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    return float((base_logprobs.exp() * (base_logprobs - logprobs)).sum(-1).mean())


@dataclasses.dataclass
class AblationSweepResult(Result):
    """One row per cell: ``{mode, gamma, k, selection ("ranked"|"random"), seed, heads, asr, asr_low, asr_high,
    harmless_refusal, loss, kl}``; plus the unablated baseline."""

    KIND: ClassVar[str] = "ablation_sweep"
    cells: list[dict[str, Any]]
    baseline: dict[str, Any]
    judge: str = "refusal"
    model_id: str = ""
    experiment: dict[str, Any] = dataclasses.field(default_factory=dict)  # what the cells were computed from

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.cells)

    def curve(self, mode: str, gamma: float, selection: str) -> tuple[list[int], list[float], list[float], list[float]]:
        """k, mean ASR, low, high for one line of the plot (random cells are averaged over seeds)."""
        rows = [c for c in self.cells if c["mode"] == mode and c["gamma"] == gamma and c["selection"] == selection]
        ks = sorted({c["k"] for c in rows})
        mean = [float(np.mean([c["asr"] for c in rows if c["k"] == k])) for k in ks]
        low = [float(np.min([c["asr_low"] for c in rows if c["k"] == k])) for k in ks]
        high = [float(np.max([c["asr_high"] for c in rows if c["k"] == k])) for k in ks]
        return ks, mean, low, high

    def plot(self):
        """ASR against k for ranked heads and for random heads of the same size, one pair of lines per (mode, γ)."""
        import plotly.graph_objects as go

        from mechcliff.plotting import OKABE_ITO, TEMPLATE

        fig = go.Figure()
        combos = sorted({(c["mode"], c["gamma"]) for c in self.cells})
        for i, (mode, gamma) in enumerate(combos):
            for sel, dash in (("ranked", "solid"), ("random", "dot")):
                ks, mean, low, high = self.curve(mode, gamma, sel)
                if not ks:
                    continue
                fig.add_trace(go.Scatter(
                    x=ks, y=mean, mode="lines+markers", name=f"{sel} heads, {mode} γ={gamma:g}",
                    line=dict(color=OKABE_ITO[i % len(OKABE_ITO)], dash=dash),
                    error_y=dict(type="data", symmetric=False, array=np.subtract(high, mean).tolist(),
                                 arrayminus=np.subtract(mean, low).tolist()),
                ))
        fig.add_hline(y=self.baseline["asr"], line=dict(dash="dash", color="gray"), annotation_text="no ablation")
        fig.update_layout(template=TEMPLATE, title="Attack success rate against the number of ablated heads",
                          xaxis_title="heads ablated (k)", yaxis_title="ASR", yaxis_range=[0, 1.02])
        return fig

    def summary_rows(self) -> list[tuple[str, str]]:
        return [("cells", str(len(self.cells))), ("baseline ASR", f"{self.baseline['asr']:.3f}"),
                ("judge", self.judge)]


_DISPLAY_ONLY = ("progress", "desc")  # generation options that cannot change a result


def _jsonable(x: Any) -> Any:
    """``x`` as it reads back from JSON (tuples become lists; anything else unknown becomes its repr)."""
    return json.loads(json.dumps(x, sort_keys=True, default=repr))


def generation_settings(generation: dict[str, Any] | None, handle: Any = None) -> dict[str, Any]:
    """The generation options that decide a result: ``generate_rollouts``'s defaults overridden by ``generation``,
    without the display-only ones (so ``{}`` and the explicit defaults are the same settings). The token budgets
    ``generate_rollouts`` takes from the model's preset when not given are filled in from ``handle``'s
    (:func:`mechcliff.model.presets.generation_budgets`)."""
    from mechcliff.generation import generate_rollouts, hashed_sampling
    from mechcliff.model.presets import generation_budgets

    params = inspect.signature(generate_rollouts).parameters
    full = {k: v.default for k, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY
            and v.default is not inspect.Parameter.empty}
    full.update(generation or {})
    full["max_think_tokens"], full["max_answer_tokens"] = generation_budgets(
        handle, full.get("max_think_tokens"), full.get("max_answer_tokens"))
    sampling = full.pop("sampling", None)  # a Sampling object: the same settings as its four keywords
    if sampling is not None:
        full.update(temperature=sampling.temperature, top_p=sampling.top_p, n_samples=sampling.n, seed=sampling.seed)
    return _jsonable({k: v for k, v in hashed_sampling(full).items() if k not in _DISPLAY_ONLY})


def _texts(prompts: Sequence[Any]) -> list[str]:
    return [p.text if isinstance(p, Prompt) else str(p) for p in prompts]


def sweep_experiment(handle: ModelHandle, attack_prompts: Sequence[Any], harmless_prompts: Sequence[Any],
                     harmless_rollouts: Sequence[Rollout], judge: Any, generation: dict[str, Any] | None,
                     seed: int) -> dict[str, Any]:
    """Everything besides the cell's own grid position and heads that a cached cell must share to be reused."""
    from mechcliff.judging import judge_identity

    template = getattr(getattr(handle, "tokenizer", None), "chat_template", None)
    return _jsonable({
        "model_hash": handle.model_hash,
        "adapter": (getattr(handle, "extra", None) or {}).get("adapter"),
        "chat_template": content_hash([template if isinstance(template, (str, type(None))) else repr(template)]),
        "attack_prompts": content_hash(_texts(attack_prompts)),
        "harmless_prompts": content_hash(_texts(harmless_prompts)),
        "harmless_rollouts": content_hash(list(harmless_rollouts)),
        "judge": judge_identity(judge),
        "generation": generation_settings(generation, handle),
        "seed": int(seed),
    })


def _cell_id(c: dict[str, Any]) -> tuple:
    """A cell's position in the grid and its heads."""
    return (c["mode"], float(c["gamma"]), int(c["k"]), c["selection"], int(c["seed"]), tuple(c["heads"]))


def _read_cells(cells_file: Path, experiment: dict[str, Any]) -> tuple[dict[tuple, dict[str, Any]], list[str]]:
    """The cells of ``cells_file`` computed in ``experiment`` (by :func:`_cell_id`), and a description of each
    line that was ignored. A torn last line (no trailing newline) is cut off; no complete line is ever removed."""
    data = cells_file.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        try:
            _cell_id(json.loads(data[cut:]))  # a complete record that only lacks its newline: keep it
            with open(cells_file, "ab") as f:
                f.write(b"\n")
            data += b"\n"
        except (ValueError, KeyError, TypeError):
            with open(cells_file, "r+b") as f:  # killed mid-write: drop the fragment so the next cell starts a line
                f.truncate(cut)
            data = data[:cut]
    done: dict[tuple, dict[str, Any]] = {}
    ignored: list[str] = []
    for raw in data.splitlines():
        try:
            rec = json.loads(raw)
            cid = _cell_id(rec)
        except (ValueError, KeyError, TypeError):
            ignored.append("not a cell (unreadable)")
            continue
        old = rec.get("experiment")
        if old == experiment:
            done.setdefault(cid, {k: v for k, v in rec.items() if k != "experiment"})
        elif not isinstance(old, dict):
            ignored.append("written before cells recorded their experiment")
        else:
            ignored.append("different " + ", ".join(sorted(k for k in set(old) | set(experiment)
                                                            if old.get(k) != experiment.get(k))))
    return done, ignored


def ablation_sweep(
    handle: ModelHandle,
    ranked_heads: Sequence[Any],
    attack_prompts: Sequence[Prompt],
    harmless_prompts: Sequence[Prompt],
    *,
    judge: Any,
    ks: Sequence[int] = (1, 2, 4, 8),
    gammas: Sequence[float] = (0.0,),
    modes: Sequence[str] = ("scale_z",),
    n_random: int = 3,
    seed: int = 0,
    harmless_rollouts: Sequence[Rollout] | None = None,
    out_dir: str | Path | None = None,
    generation: dict[str, Any] | None = None,
    progress: bool = True,
) -> AblationSweepResult:
    """Run the grid ``modes × gammas × ks`` for the top-``k`` of ``ranked_heads`` and ``n_random`` random sets.

    Each cell: ASR on ``attack_prompts``, refusal of ``harmless_prompts``, capability loss and KL (module
    docstring). Modes without a γ (``zero``) run once, whatever ``gammas``; ``mean`` is not supported.

    Args:
        handle: the loaded model (:func:`mechcliff.load_model`).
        ranked_heads: heads, strongest first (e.g. ``HeadAttribution.ranked_heads()``); cell ``k`` ablates the
            first ``k``.
        attack_prompts: the prompts whose ASR (answers not refused) is measured.
        harmless_prompts: harmless prompts: their refusal rate, and the KL at the end of their generation prompt.
        judge: the refusal judge (:func:`mechcliff.judges.get_judge`).
        ks: the numbers of heads ablated (each between 1 and ``len(ranked_heads)``).
        gammas: the γ values of the modes that take one (see :func:`mechcliff.interventions.intervene`).
        modes: intervention modes (:data:`mechcliff.interventions.MODES` except ``mean``).
        n_random: random head sets of the same size per cell (the control).
        seed: seed of the random head sets.
        harmless_rollouts: unablated harmless rollouts the capability loss is measured on; default: generated.
        out_dir: a folder for ``cells.jsonl`` (cells appended as they finish, reused on a re-run); None: no file.
        generation: keyword arguments for :func:`mechcliff.generation.generate_rollouts` (budgets, ...).
        progress: show a progress bar over the cells.
    """
    from mechcliff.asr import asr_of, random_head_sets, refusal_flags
    from mechcliff.generation import encode_rollouts, generate_rollouts
    from mechcliff.stats import Rate

    ranked = [parse_head(h) for h in ranked_heads]
    if not ranked:
        raise MechcliffError("ranked_heads is empty")
    if any(k < 1 or k > len(ranked) for k in ks):
        raise MechcliffError(f"every k must be between 1 and the number of ranked heads ({len(ranked)}), got {list(ks)}")
    from mechcliff.interventions import GAMMA_MODES, check_gamma

    def gammas_of(mode: str) -> Sequence[float]:  # zero takes no gamma: one cell, not one per gamma
        return gammas if mode in GAMMA_MODES else (0.0,)

    for mode in modes:  # fail before any generation ("mean" needs mean_z, which the sweep does not compute)
        if mode == "mean":
            raise MechcliffError("ablation_sweep does not run mode 'mean' (it needs the heads' mean outputs); "
                                 f"use one of {', '.join(GAMMA_MODES)} or 'zero'")
        for gamma in gammas_of(mode):
            check_gamma(mode, gamma)
    gen = {"progress": False, **(generation or {})}
    cells_file = Path(out_dir) / "cells.jsonl" if out_dir is not None else None
    if harmless_rollouts is None:
        harmless_rollouts = generate_rollouts(handle, list(harmless_prompts), **gen)
    experiment = sweep_experiment(handle, attack_prompts, harmless_prompts, harmless_rollouts, judge, generation, seed)
    done: dict[tuple, dict[str, Any]] = {}
    if cells_file is not None and cells_file.exists():
        done, ignored = _read_cells(cells_file, experiment)
        if ignored:
            why = "; ".join(f"{n} line(s): {w}" for w, n in
                            sorted({w: ignored.count(w) for w in ignored}.items(), key=lambda wn: -wn[1]))
            warnings.warn(f"{cells_file}: {len(ignored)} cached cell(s) come from another experiment and are not "
                          f"reused (they stay in the file); {why}", stacklevel=2)
    cap_batch = encode_rollouts(handle, list(harmless_rollouts), enable_thinking=gen.get("enable_thinking", True))
    kl_batch = encode(handle, [p.text if isinstance(p, Prompt) else p for p in harmless_prompts],
                      enable_thinking=gen.get("enable_thinking", True))
    base_lp = next_token_logprobs(handle, kl_batch)
    base_attack = generate_rollouts(handle, list(attack_prompts), **gen)
    base_rate = asr_of(base_attack, judge)
    baseline = {"asr": base_rate["rate"], "asr_low": base_rate["low"], "asr_high": base_rate["high"],
                "harmless_refusal": float(np.mean(refusal_flags(harmless_rollouts, judge))),
                "loss": continuation_loss(handle, cap_batch), "kl": 0.0}
    plan = []
    for mode in modes:
        for gamma in gammas_of(mode):
            for k in ks:
                plan.append((mode, float(gamma), int(k), "ranked", 0, ranked[:k]))
                for i, hs in enumerate(random_head_sets(handle, k, n_random, seed + 1000 * k)):
                    plan.append((mode, float(gamma), int(k), "random", i, hs))
    from tqdm.auto import tqdm

    cells = []
    for mode, gamma, k, sel, sd, hs in tqdm(plan, desc="sweep", disable=not progress, leave=False):
        key = (mode, gamma, k, sel, sd, tuple(head_label(h) for h in hs))
        if key in done:
            cells.append(done[key])
            continue
        with intervene(handle, hs, mode=mode, gamma=gamma):
            att = generate_rollouts(handle, list(attack_prompts), **gen)
            harmless = generate_rollouts(handle, list(harmless_prompts), **gen)
            loss = continuation_loss(handle, cap_batch)
            kl = mean_kl(base_lp, next_token_logprobs(handle, kl_batch))
        a = asr_of(att, judge)
        hr = Rate.of(sum(refusal_flags(harmless, judge)), len(harmless))
        cell = {"mode": mode, "gamma": gamma, "k": k, "selection": sel, "seed": sd,
                "heads": [head_label(h) for h in hs], "asr": a["rate"], "asr_low": a["low"], "asr_high": a["high"],
                "harmless_refusal": hr.rate, "loss": loss, "kl": kl}
        cells.append(cell)
        if cells_file is not None:
            cells_file.parent.mkdir(parents=True, exist_ok=True)
            with open(cells_file, "a") as f:
                f.write(json.dumps({**cell, "experiment": experiment}) + "\n")
    return AblationSweepResult(cells=cells, baseline=baseline, judge=getattr(judge, "name", "judge"),
                               model_id=handle.model_id, experiment=experiment)
