"""Refusal heads by attention shift (arXiv 2509.00544 "When Thinking Backfires").

For each head, the key position with the **largest attention weight** from the **first answer token** (the paper's
"first generated token"), once with thinking on and once with thinking off, on the same prompts. The paper's
refusal heads are those whose argmax moves from the ``assistant`` role token (thinking on) to the empty span
between ``<think></think>`` (thinking off); the frequency of that move over prompts ranks them (Fig. 4b). The
detected heads are then ablated (their attention output zeroed, ``scale_z`` with γ = 0) and the refusal probe is
read at the between-think-tags token of the thinking-off prompt, against the same number of random heads **per
layer** (Fig. 5).

Definitions (where the paper leaves them open):

* **query**: ``"first_answer"`` (default): the greedy first answer token is computed from the logits at the end of
  the prompt (+ thinking + closing template) and appended; its attention row is read. ``"think_end"`` reads the
  row of the last template token instead (the position that *predicts* the first answer token).
* **key regions** of every position (:data:`REGIONS`): ``bos``, ``prompt`` (the user's text), ``template`` (other
  chat-template tokens), ``assistant`` (the tokens spelling the role name of the generation prompt: the last
  "assistant" after the prompt; where a template has none, the last template token before the thinking),
  thinking on: ``think_open`` (the opener), ``thinking`` (the chain of thought), ``closing`` (the closing
  template); thinking off: ``think_tags`` (tokens of ``<think>`` and ``</think>``), ``think_gap`` (tokens strictly
  between them, e.g. Qwen3's ``\\n\\n``), ``closing`` (after ``</think>``); ``answer`` (the query itself).
* **shift** of a head on a prompt: argmax region ``assistant`` with thinking on and, with thinking off, the gap
  between the tags; when a template writes no token between them (the organism's ``<think> </think>``), the tags
  themselves. ``any_shift`` (reported too): the argmax region differs between the modes.
* **detected heads**: shift frequency ≥ ``min_frequency`` (default 0.4: the lowest frequency the paper lists for a
  named head in Fig. 4b is 0.41, above the 0.11–0.19 of the others), or the ``top_k`` most frequent.
* **probe position** ("between"): the last token strictly between the tags in the thinking-off prompt, else the
  last token of ``</think>``.

Memory: one forward per batch and mode with a hook on every ``blocks.{l}.attn.hook_pattern`` that keeps only the
query row of each example, reduced at once to its argmax and maximum: O(batch × heads) per layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from mechcliff.controls import layer_counts, random_controls
from mechcliff.data import Prompt, Rollout
from mechcliff.errors import MechcliffError
from mechcliff.interventions import head_label, intervene, parse_head
from mechcliff.model.capture import MAX_TOKENS, act_name, capture
from mechcliff.model.handle import ModelHandle
from mechcliff.results import Result

REGIONS = ("pad", "bos", "prompt", "template", "assistant", "think_open", "thinking", "closing", "think_tags",
           "think_gap", "answer")
R = {name: i for i, name in enumerate(REGIONS)}
QUERIES = ("first_answer", "think_end")


# --------------------------------------------------------------------------- key regions


def _pieces(tok: Any, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text of ``ids`` decoded token by token, and each token's character range in it."""
    text, spans = "", []
    for t in ids:
        s = tok.decode([int(t)], skip_special_tokens=False)
        spans.append((len(text), len(text) + len(s)))
        text += s
    return text, spans


def _overlapping(spans: list[tuple[int, int]], lo: int, hi: int) -> list[int]:
    return [j for j, (s, e) in enumerate(spans) if e > s and s < hi and e > lo]


def key_regions(handle: ModelHandle, batch: Any, i: int, *, thinking: bool) -> tuple[np.ndarray, bool]:
    """Region code (:data:`REGIONS`) of every position of example ``i`` (padded coordinates), and whether the
    thinking-off block has tokens strictly between its tags."""
    tok, fmt = handle.tokenizer, handle.think
    ids = batch.tokens[i].tolist()
    width, pad = len(ids), batch.pad_lengths[i]
    sp = batch.spans[i]
    lab = np.full(width, R["template"], dtype=np.int8)
    lab[:pad] = R["pad"]
    if tok.bos_token_id is not None and pad < width and ids[pad] == tok.bos_token_id:
        lab[pad] = R["bos"]
    p0, p1 = sp["prompt"]
    lab[p0:p1] = R["prompt"]
    pe = sp["prefix"][1]
    a0, a1 = sp["answer"]
    lab[a0:a1] = R["answer"]
    has_gap = False
    role_end = pe
    if thinking:
        t0, t1 = sp["thinking"]
        c0, c1 = sp["closing"]
        lab[pe:t0] = R["think_open"]
        lab[t0:t1] = R["thinking"]
        lab[c0:c1] = R["closing"]
    else:
        start = max(p1, pad)
        text, spans = _pieces(tok, ids[start:a0])
        c = text.rfind(fmt.close_tag)
        o = text.rfind(fmt.open_tag, 0, c) if c >= 0 else -1
        if c < 0 or o < 0:
            raise MechcliffError(
                "the thinking-off prompt has no thinking block (no "
                f"{fmt.open_tag!r} ... {fmt.close_tag!r} after the prompt): the attention-shift method needs the "
                "empty block; use no_think_format 'template' (a template with a thinking switch) or 'empty_block'")
        tags = set(_overlapping(spans, o, o + len(fmt.open_tag))) | set(_overlapping(spans, c, c + len(fmt.close_tag)))
        gap = [j for j in _overlapping(spans, o + len(fmt.open_tag), c) if j not in tags]
        after = [j for j, (s, e) in enumerate(spans) if s >= c + len(fmt.close_tag) and j not in tags]
        for j in after:
            lab[start + j] = R["closing"]
        for j in tags:
            lab[start + j] = R["think_tags"]
        for j in gap:
            lab[start + j] = R["think_gap"]
        has_gap = bool(gap)
        role_end = start + min(tags)
    # the role token(s): the last "assistant" between the prompt and the thinking block
    start = max(p1, pad)
    text, spans = _pieces(tok, ids[start:role_end])
    k = text.lower().rfind("assistant")
    if k >= 0:
        for j in _overlapping(spans, k, k + len("assistant")):
            lab[start + j] = R["assistant"]
    elif role_end - 1 >= start:
        lab[role_end - 1] = R["assistant"]
    return lab, has_gap


def between_positions(handle: ModelHandle, batch: Any) -> torch.Tensor:
    """Per example of a thinking-off batch: the last token strictly between the think tags, else the last tag
    token (``</think>``)."""
    out = []
    for i in range(len(batch)):
        lab, has_gap = key_regions(handle, batch, i, thinking=False)
        want = R["think_gap"] if has_gap else R["think_tags"]
        out.append(int(np.flatnonzero(lab == want)[-1]))
    return torch.tensor(out, dtype=torch.long)


# --------------------------------------------------------------------------- attention argmax


def argmax_keys(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax key and maximum weight of attention rows ``[..., key]`` (ties: the earliest key)."""
    w, k = rows.max(-1)
    first = (rows == w[..., None]).float().argmax(-1)  # earliest maximal key, whatever torch.max returns on ties
    return first, w


@dataclasses.dataclass
class _Tokens:
    """A token batch for :func:`~mechcliff.model.capture.capture` (the prompts with their first answer token)."""

    tokens: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@torch.no_grad()
def first_token_attention(handle: ModelHandle, batch: Any, *, query: str = "first_answer", batch_size: int = 16,
                          max_tokens: int | None = MAX_TOKENS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every example, layer and head: the argmax key position (padded coordinates of ``batch``; the appended
    first answer token is position ``width``) and its weight, from the query row; and the query positions.

    Both passes run in chunks of at most ``batch_size`` rows and ``max_tokens`` padded tokens. The greedy first
    answer token is the argmax of the unembedding of the final norm's output at the last position (the same argmax
    as the logits: a final soft-cap or logit scale is monotone), so no ``[batch, pos, vocab]`` logits are formed."""
    if query not in QUERIES:
        raise MechcliffError(f"query must be one of {', '.join(QUERIES)}, not {query!r}")
    n, L, H = len(batch), handle.n_layers, handle.n_heads
    arg = np.zeros((n, L, H), dtype=np.int64)
    wts = np.zeros((n, L, H), dtype=np.float32)
    qpos_all = np.zeros(n, dtype=np.int64)
    names = [act_name("pattern", l) for l in range(L)]
    missing = [nm for nm in names if nm not in handle.bridge.hook_dict]
    if missing:
        raise MechcliffError(f"this model has no attention-pattern hook {missing[0]}")
    if query == "first_answer":  # the greedy first answer token of each example, appended at position `width`
        nxt = torch.zeros(n, dtype=batch.tokens.dtype)
        unembed = handle.bridge.unembed
        lm_head = getattr(unembed, "original_component", None) or unembed
        last = torch.full((n,), batch.tokens.shape[1] - 1, dtype=torch.long)

        def next_token(x: torch.Tensor, where: Any) -> torch.Tensor:
            return lm_head(x).argmax(-1)

        for chunk in capture(handle, batch, {act_name("ln_final"): next_token}, at=last, batch_size=batch_size,
                             max_tokens=max_tokens):
            nxt[chunk.where.index] = chunk.values[act_name("ln_final")].to(nxt.dtype)
        mask = batch.attention_mask
        run: Any = _Tokens(torch.cat([batch.tokens, nxt[:, None]], 1),
                           torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype)], 1))
        qpos = torch.full((n,), batch.tokens.shape[1], dtype=torch.long)
    else:
        run, qpos = batch, batch.require("think_end", "a think_end")

    def read(rows: torch.Tensor, where: Any) -> torch.Tensor:  # rows: the query rows [b, H, K]
        k, w = argmax_keys(rows.float())
        return torch.stack([k.double(), w.double()])  # both exact in float64: [2, b, H]

    for chunk in capture(handle, run, {nm: read for nm in names}, at=qpos, batch_size=batch_size,
                         max_tokens=max_tokens):
        idx = chunk.where.index.numpy()
        for l, nm in enumerate(names):
            kw = chunk.values[nm]
            arg[idx, l] = kw[0].long().numpy()
            wts[idx, l] = kw[1].float().numpy()
    qpos_all[:] = qpos.numpy()
    return arg, wts, qpos_all


def shift_frequency(region_on: np.ndarray, region_off: np.ndarray, has_gap: np.ndarray,
                    valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per head ``[L, H]``: the fraction of (valid) examples whose argmax moves from ``assistant`` (thinking on) to
    the between-tags target (the gap, or the tags where the example has no gap token); and the fraction whose
    argmax region differs at all. Inputs ``[n, L, H]`` region codes and ``[n]`` flags."""
    region_on, region_off = np.asarray(region_on), np.asarray(region_off)
    n = region_on.shape[0]
    valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if not valid.any():
        shape = region_on.shape[1:]
        return np.full(shape, np.nan), np.full(shape, np.nan)
    target = np.where(np.asarray(has_gap, dtype=bool), R["think_gap"], R["think_tags"])[:, None, None]
    shift = (region_on == R["assistant"]) & (region_off == target)
    return shift[valid].mean(0), (region_on != region_off)[valid].mean(0)


def random_heads_per_layer(handle: ModelHandle, heads: Sequence[Any], n_sets: int, seed: int) -> list[list[tuple[int, int]]]:
    """``n_sets`` seeded sets with, in every layer, as many random heads as ``heads`` has there (never one of
    ``heads``; all the others of that layer when there are fewer)."""
    parsed = [parse_head(h) for h in heads]
    return random_controls(handle.n_layers, handle.n_heads, layer_counts(parsed), n_sets, seed, exclude=parsed)


# --------------------------------------------------------------------------- result


@dataclasses.dataclass
class RefusalHeads(Result):
    """Attention-argmax regions of the first answer token per example, layer and head in both modes, the shift
    frequencies, the detected heads and their ablation (probe at the between-tags token vs random per layer)."""

    KIND: ClassVar[str] = "refusal_heads"
    region_on: np.ndarray  # [n, L, H] int8, codes of REGIONS
    region_off: np.ndarray
    offset_on: np.ndarray  # [n, L, H] argmax key - query position (<= 0)
    offset_off: np.ndarray
    weight_on: np.ndarray  # [n, L, H] the maximal attention weight
    weight_off: np.ndarray
    has_gap: np.ndarray  # [n] the thinking-off block has tokens strictly between its tags
    valid: np.ndarray  # [n]
    heads: list[str]
    min_frequency: float = 0.4
    top_k: int | None = None
    query: str = "first_answer"
    no_think_format: str = "template"
    regions: list[str] = dataclasses.field(default_factory=lambda: list(REGIONS))
    ablation: dict[str, Any] | None = None
    reference_heads: list[str] = dataclasses.field(default_factory=list)  # e.g. the organism's planted heads
    model_id: str = ""

    @property
    def frequency(self) -> np.ndarray:
        return shift_frequency(self.region_on, self.region_off, self.has_gap, self.valid)[0]

    @property
    def any_shift(self) -> np.ndarray:
        return shift_frequency(self.region_on, self.region_off, self.has_gap, self.valid)[1]

    def ranked(self) -> list[tuple[str, float]]:
        """Heads with a positive shift frequency, most frequent first (ties: lower layer, then head)."""
        f = self.frequency
        cells = [(float(f[l, h]), l, h) for l in range(f.shape[0]) for h in range(f.shape[1]) if f[l, h] > 0]
        cells.sort(key=lambda c: (-c[0], c[1], c[2]))
        return [(head_label((l, h)), v) for v, l, h in cells]

    def region_counts(self, mode: str = "on") -> dict[str, int]:
        """How often each region holds the argmax, over valid examples and all heads."""
        arr = (self.region_on if mode == "on" else self.region_off)[np.asarray(self.valid, dtype=bool)]
        return {name: int((arr == i).sum()) for i, name in enumerate(self.regions) if (arr == i).any()}

    def plot(self):
        """Heatmap of the per-head shift frequency (assistant → between think tags), detected heads outlined."""
        from mechcliff.plotting import layer_head_heatmap

        f = np.nan_to_num(self.frequency, nan=0.0)
        return layer_head_heatmap(
            f, title=f"Attention-shift refusal heads: {self.model_id or 'model'} (n={int(np.sum(self.valid))})",
            colorbar_title="shift frequency", signed=False,
            highlight=[parse_head(h) for h in self.heads] or None,
            highlight_name=f"detected (≥ {self.min_frequency:g})" if self.top_k is None else f"top {self.top_k}")

    def plot_ablation(self):
        """Mean probe score at the between-tags token: no ablation, detected heads, random heads per layer."""
        from mechcliff.plotting import asr_bars

        if not self.ablation:
            raise MechcliffError("this result has no ablation (no heads detected, or no probe)")
        ab = self.ablation
        conds = [("no ablation", ab["baseline"]), (f"detected ({len(self.heads)})", ab["targeted"])]
        conds += [(f"random per layer {i}", r) for i, r in enumerate(ab["random"])]

        def ci(d: dict[str, Any]) -> tuple[float, float]:
            s = np.asarray(d["scores"], dtype=float)
            half = 1.96 * s.std(ddof=1) / np.sqrt(len(s)) if len(s) > 1 else 0.0
            return max(0.0, s.mean() - half), min(1.0, s.mean() + half)

        fig = asr_bars([c for c, _ in conds], [d["score"] for _, d in conds], [ci(d)[0] for _, d in conds],
                       [ci(d)[1] for _, d in conds], title="Refusal probe at the between-think-tags token")
        fig.update_yaxes(title_text="mean probe score")
        return fig

    def summary_rows(self) -> list[tuple[str, str]]:
        rows = [("model", self.model_id), ("examples", f"{int(np.sum(self.valid))} of {len(self.valid)}"),
                ("query", self.query), ("thinking off", self.no_think_format),
                ("top shift frequencies", ", ".join(f"{h} {v:.2f}" for h, v in self.ranked()[:8]) or "none"),
                ("detected heads", ", ".join(self.heads) or "none")]
        if self.reference_heads:
            rows.append(("reference heads", ", ".join(self.reference_heads)))
        if self.ablation:
            ab = self.ablation
            rows.append(("probe score: none / detected / random",
                         f"{ab['baseline']['score']:.3f} / {ab['targeted']['score']:.3f} / "
                         f"{np.mean([r['score'] for r in ab['random']]) if ab['random'] else float('nan'):.3f}"))
        return rows


# --------------------------------------------------------------------------- the experiment


@torch.no_grad()
def probe_scores_at(handle: ModelHandle, batch: Any, probe: Any, positions: torch.Tensor, batch_size: int = 16) -> np.ndarray:
    """Probe logits at one position per example (whatever interventions are active)."""
    from mechcliff.probe import collect_residuals

    x = collect_residuals(handle, batch, [probe.layer], positions, batch_size)[:, 0]
    return np.asarray(probe.logit(x), dtype=np.float64)


def _ablation(handle: ModelHandle, heads: list[tuple[int, int]], batch: Any, probe: Any, n_random: int, seed: int,
              batch_size: int) -> dict[str, Any]:
    pos = between_positions(handle, batch)

    def measure(hs: list[tuple[int, int]] | None) -> dict[str, Any]:
        if hs:
            with intervene(handle, hs, mode="scale_z", gamma=0.0):
                logit = probe_scores_at(handle, batch, probe, pos, batch_size)
        else:
            logit = probe_scores_at(handle, batch, probe, pos, batch_size)
        score = 1.0 / (1.0 + np.exp(-logit))
        return {"heads": [head_label(h) for h in hs or []], "score": float(score.mean()),
                "logit": float(logit.mean()), "scores": score.tolist()}

    base = measure(None)
    targeted = measure(heads)
    rand = [measure(hs) for hs in random_heads_per_layer(handle, heads, n_random, seed)]
    rm = float(np.mean([r["score"] for r in rand])) if rand else float("nan")
    return {"position": "between", "probe_layer": int(probe.layer), "n": len(batch), "mode": "scale_z", "gamma": 0.0,
            "baseline": base, "targeted": targeted, "random": rand,
            "drop_targeted": base["score"] - targeted["score"], "drop_random_mean": base["score"] - rm}


def refusal_heads(
    handle: ModelHandle,
    harmful_prompts: Sequence[Any],
    *,
    harmless_prompts: Sequence[Any] | None = None,
    probe: Any = None,
    thinking_rollouts: Sequence[Rollout] | None = None,
    no_think_format: str = "template",
    query: str = "first_answer",
    min_frequency: float = 0.4,
    top_k: int | None = None,
    n_random: int = 3,
    seed: int = 0,
    max_think_tokens: int | None = None,
    max_answer_tokens: int | None = None,
    batch_size: int = 16,
    label_source: str = "auto",
    progress: bool = True,
    log: Any = None,
) -> RefusalHeads:
    """Detect refusal heads by the argmax shift of the first answer token's attention (module docstring), then
    ablate them and read the refusal probe at the between-think-tags token of the thinking-off prompts.

    ``thinking_rollouts``: thinking-on rollouts of ``harmful_prompts`` (same order), else generated. ``probe``: a
    probe of this model; without one, and with ``harmless_prompts``, one is fitted on thinking-off rollouts at the
    between-tags token (behaviour labels when possible, as the paper's refusal-vs-fulfilment probe; else harmful vs
    harmless). Without either, the ablation is skipped (``ablation=None``). ``max_think_tokens`` /
    ``max_answer_tokens``: None = 4,096 / 512 on real models, 48 / 32 on the organisms
    (:func:`mechcliff.model.presets.generation_budgets`)."""
    from mechcliff.model.presets import STUDY_BUDGETS, generation_budgets
    from mechcliff.modes import (check_no_think_format, encode_mode, encode_prompts_mode, fit_rollout_probe,
                                 generate_mode_rollouts)

    max_think_tokens, max_answer_tokens = generation_budgets(handle, max_think_tokens, max_answer_tokens, short=STUDY_BUDGETS)
    check_no_think_format(handle, no_think_format)
    if no_think_format == "omit":
        raise MechcliffError("refusal heads need a thinking block in the thinking-off prompt; use no_think_format "
                             "'template' or 'empty_block', not 'omit'")
    if query not in QUERIES:
        raise MechcliffError(f"query must be one of {', '.join(QUERIES)}, not {query!r}")
    if not 0.0 <= float(min_frequency) <= 1.0:
        raise MechcliffError(f"min_frequency must be between 0 and 1, got {min_frequency!r}")
    if top_k is not None and top_k < 1:
        raise MechcliffError(f"top_k must be at least 1, got {top_k}")
    prompts = [p if isinstance(p, Prompt) else Prompt(text=p, group="harmful") for p in harmful_prompts]
    if not prompts:
        raise MechcliffError("no harmful prompts")
    if probe is not None:
        probe.check_model(handle)
    gen: dict[str, Any] = dict(max_think_tokens=max_think_tokens, seed=seed, batch_size=batch_size, progress=progress)
    if thinking_rollouts is None:
        thinking_rollouts = generate_mode_rollouts(handle, prompts, thinking=True, max_answer_tokens=1,
                                                   desc="thinking on", **gen)
    elif len(thinking_rollouts) != len(prompts):
        raise MechcliffError(f"{len(thinking_rollouts)} thinking rollouts for {len(prompts)} prompts")
    on_batch = encode_mode(handle, list(thinking_rollouts), thinking=True, answers=False)
    off_batch = encode_prompts_mode(handle, prompts, thinking=False, no_think_format=no_think_format)
    n, L, H = len(prompts), handle.n_layers, handle.n_heads
    regions, offsets, weights, gaps = {}, {}, {}, np.zeros(n, dtype=bool)
    valid = np.asarray([r.has_think_close for r in thinking_rollouts], dtype=bool)
    for mode, batch in (("on", on_batch), ("off", off_batch)):
        arg, w, qpos = first_token_attention(handle, batch, query=query, batch_size=batch_size)
        reg = np.zeros((n, L, H), dtype=np.int8)
        for i in range(n):
            lab, has_gap = key_regions(handle, batch, i, thinking=mode == "on")
            lab = np.append(lab, R["answer"])  # the appended first answer token (query "first_answer")
            reg[i] = lab[arg[i]]
            if mode == "off":
                gaps[i] = has_gap
        regions[mode], offsets[mode], weights[mode] = reg, (arg - qpos[:, None, None]).astype(np.int32), w
    freq, _ = shift_frequency(regions["on"], regions["off"], gaps, valid)
    cells = sorted(((float(freq[l, h]), l, h) for l in range(L) for h in range(H) if freq[l, h] > 0),
                   key=lambda c: (-c[0], c[1], c[2]))
    chosen = cells[:top_k] if top_k is not None else [c for c in cells if c[0] >= min_frequency]
    heads = [(l, h) for _, l, h in chosen]
    ablation = None
    if heads and (probe is not None or harmless_prompts):
        if probe is None:
            assert harmless_prompts, "no probe: the condition above needs harmless prompts to fit one"
            harmless = [p if isinstance(p, Prompt) else Prompt(text=p, group="harmless") for p in harmless_prompts]
            off_gen = dict(gen, max_answer_tokens=max_answer_tokens)
            off_harmful = generate_mode_rollouts(handle, prompts, thinking=False, no_think_format=no_think_format,
                                                 desc="thinking off (probe)", **off_gen)
            off_harmless = generate_mode_rollouts(handle, harmless, thinking=False, no_think_format=no_think_format,
                                                  desc="thinking off (probe)", **off_gen)
            pool = off_harmless + off_harmful
            pool_pos = between_positions(handle, encode_mode(handle, pool, thinking=False,
                                                             no_think_format=no_think_format))
            probe = fit_rollout_probe(handle, off_harmful, off_harmless, thinking=False, no_think_format=no_think_format,
                                      position=pool_pos, label_source=label_source, seed=seed, batch_size=batch_size,
                                      log=log)
            probe.position = "between"
        ablation = _ablation(handle, heads, off_batch, probe, n_random, seed, batch_size)
        ablation["probe_label_source"] = probe.label_source
        ablation["probe_val_accuracy"] = probe.metrics.get("val_accuracy")
    gt = handle.ground_truth
    return RefusalHeads(
        region_on=regions["on"], region_off=regions["off"], offset_on=offsets["on"], offset_off=offsets["off"],
        weight_on=weights["on"], weight_off=weights["off"], has_gap=gaps, valid=valid,
        heads=[head_label(h) for h in heads], min_frequency=float(min_frequency), top_k=top_k, query=query,
        no_think_format=no_think_format, ablation=ablation,
        reference_heads=list(gt.planted_labels) if gt is not None else [], model_id=handle.model_id,
    )
