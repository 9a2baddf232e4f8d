"""Batched rollouts: thinking, then answer, split at ``</think>``.

Generation runs in two phases, both through ``hf_model.generate`` (the bridge wraps the HF modules in place, so
any active mechcliff intervention hooks fire at every step, KV cache included):

1. **Thinking**: the prompt is rendered by the chat template, the think opener is prefilled, and the model writes
   until it closes the thinking (``</think>``), ends its turn, or reaches ``max_think_tokens``. A thinking that did
   not close is closed by us ("budget forcing", as in the truncation experiment of arXiv 2510.06036);
   ``meta["closed_by_model"]`` records which happened.
2. **Answer**: prompt + thinking + closing template are re-encoded token-exactly (:func:`mechcliff.chat.encode`)
   and the model writes the answer until its end-of-turn token or ``max_answer_tokens``. Think tags the model
   writes into its answer anyway are not the answer: ``response`` is the text after the last ``</think>``, cut at a
   ``<think>`` that never closes (:func:`mechcliff.judges.final_answer`); ``meta["raw_response"]`` keeps the
   generated text when it differs.

``max_think_tokens=0`` skips phase 1: the thinking is empty and closed (``thinking == ""``) and the model answers
right after the closing template. ``enable_thinking=False`` is a different mode, thinking off: no think block of
ours (``thinking is None``), the chat template decides (Qwen3 and the organism write an empty one themselves).

Greedy decoding by default (``temperature=0``). Batches are left-padded with an attention mask, so greedy batched
output equals one-at-a-time output (a test checks this).

**Sampling as in the papers** (:class:`Sampling`; arXiv 2510.06036 samples with T = 0.7): temperature, top-p and
``n`` samples per prompt, each sample with a seed of its own. The sampling is ours, not HF's: generation stays
greedy (``do_sample=False``) and :class:`SeededSampler`, the last logits processor, divides the logits by T,
masks the tokens outside the top-p nucleus (the semantics of HF's ``TopPLogitsWarper``) and draws the next token
from the truncated, renormalised ``softmax(logits / T)``. Every row draws from a CPU ``torch.Generator`` of its own,
seeded from ``(seed, prompt index, sample index, phase)`` (:meth:`Sampling.sample_seed`), one number per step:
sample k of prompt i is the same tokens whatever the batch size and whichever prompts share its batch (up to the
float rounding of the logits, as for greedy), on any device. Thinking and answer (phases 0 and 1) each get their
stream: a generator continued from the thinking into the answer would depend on how many steps its batch ran (a
finished row keeps drawing until the whole batch stops). The same prompt index gives the same draws with and
without an intervention (common random numbers: a paired comparison). Top-k is not applied (HF's sampling would
apply the model's ``generation_config.top_k``, often 50; the papers report temperature and top-p).

**The model's context** (``handle.n_ctx``) bounds prompt + thinking + closing template + answer. Prompts are never
truncated (a cut prompt is another prompt). Before anything is generated, every prompt is measured: one that
leaves no room for a single answer token raises :class:`~mechcliff.errors.MechcliffError` naming it and its
length; for one that fits but not with the full budgets, the thinking budget is cut first, then the answer budget,
so that the whole sequence fits (a :class:`ContextLengthWarning` names each such prompt, its length, the budgets
and the context; ``meta["context_capped"]`` records them). Those prompts are generated in batches of their own, so
the other prompts' rollouts are exactly what they would be without them.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from mechcliff.chat import encode
from mechcliff.data import Prompt, Rollout
from mechcliff.errors import MechcliffError
from mechcliff.judges import final_answer
from mechcliff.model.capture import to_device


class ContextLengthWarning(UserWarning):
    """Some prompts fit the model's context only with smaller thinking / answer budgets (see the module docstring)."""


def _real(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise MechcliffError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _count(name: str, v: Any, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise MechcliffError(f"{name} must be an integer >= {low}, got {v!r}")
    return v


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How rollouts are decoded: greedy (``temperature=0``, the default) or sampled with temperature and top-p,
    ``n`` samples per prompt, each seeded on its own (see the module docstring). arXiv 2510.06036 samples with
    ``Sampling(temperature=0.7)``.

    Args:
        temperature: 0 = greedy; above 0, the logits are divided by it before sampling.
        top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability reaches ``top_p``
            (always the most likely token); 1 = no truncation. Unused when greedy.
        n: samples per prompt (above 1 needs ``temperature > 0``: greedy samples are identical).
        seed: the base seed; sample k of prompt i is seeded from ``(seed, i, k)``.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        t, p = _real("temperature", self.temperature), _real("top_p", self.top_p)
        if t < 0:
            raise MechcliffError(f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}")
        if not 0.0 < p <= 1.0:
            raise MechcliffError(f"top_p must be in (0, 1] (1: no truncation), got {self.top_p!r}")
        n = _count("n (samples per prompt)", self.n, 1)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise MechcliffError(f"seed must be an integer, got {self.seed!r}")
        if n > 1 and t == 0:
            raise MechcliffError(f"{n} samples per prompt need a temperature > 0: greedy samples are identical")
        object.__setattr__(self, "temperature", t)
        object.__setattr__(self, "top_p", p)

    @property
    def greedy(self) -> bool:
        """Whether decoding is greedy (``temperature == 0``)."""
        return self.temperature == 0

    def sample_seed(self, prompt_index: int, sample: int, phase: int) -> int:
        """The seed of one row's draws: ``SeedSequence([seed, prompt_index, sample, phase])`` (phase 0: thinking,
        1: answer; a negative seed taken modulo 2**64), a 64-bit integer."""
        entropy = [self.seed % 2**64, prompt_index, sample, phase]
        state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)
        return int(state[0])

    def generator(self, prompt_index: int, sample: int, phase: int) -> torch.Generator:
        """A CPU generator seeded with :meth:`sample_seed`."""
        return torch.Generator().manual_seed(self.sample_seed(prompt_index, sample, phase))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def hashed_sampling(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (generation options by name) as results are keyed by them: ``top_p`` 1 and ``n_samples`` 1 left
    out, so that keys from before those options still match; a sampled setting (``temperature > 0``) marked as
    seeded per sample, so that results sampled before (seeded per batch) are not taken for these."""
    out = {k: v for k, v in settings.items() if not (k in ("top_p", "n_samples") and v == 1)}
    if out.get("temperature", 0) > 0:
        out["sampler"] = "per-sample seeds"
    return out


def top_p_mask(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """``scores`` with the tokens outside each row's top-p nucleus set to -inf, as HF's ``TopPLogitsWarper``: sorted
    ascending, a token is dropped when the cumulative probability up to it is ``<= 1 - top_p``; the most likely
    token is always kept."""
    if top_p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
    drop = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    drop[..., -1] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


class SeededSampler:
    """A logits processor (HF ``generate(logits_processor=...)``, the last one) that makes greedy decoding sample,
    each row from a generator of its own: the logits over ``temperature``, top-p masked (:func:`top_p_mask`), then
    one token drawn from their softmax by inverse transform sampling (the first token whose cumulative probability,
    summed in float64, reaches ``u`` times the total, ``u`` one uniform from the row's CPU generator) and returned as the
    only finite score, which greedy decoding then takes. Every call draws exactly one number per row, so a row's
    tokens depend on its own generator and its own logits only.

    Why not the Gumbel-max trick (argmax of logits + Gumbel noise, the same distribution): it needs one uniform per
    vocabulary entry and step from the rows' CPU generators (copied to the model's device on a GPU), and
    ``python scripts/bench/sampler.py`` (16 x 152k, one thread) measured it at 1.2-1.6x this sampler's whole step
    (59-74 ms against 46-50 ms, most of which is the softmax and float64 cumulative sum over the vocabulary, which
    run on the scores' device: float32 on MPS, which has no float64)."""

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float = 1.0):
        if not temperature > 0:
            raise MechcliffError(f"SeededSampler samples: temperature must be > 0, got {temperature!r}")
        self.generators, self.temperature, self.top_p = list(generators), float(temperature), float(top_p)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.generators):
            raise MechcliffError(f"SeededSampler has {len(self.generators)} generators for {scores.shape[0]} rows")
        x = top_p_mask(scores.float() / self.temperature, self.top_p)
        dtype = torch.float32 if x.device.type == "mps" else torch.float64
        cdf = torch.softmax(x, dim=-1).to(dtype).cumsum(dim=-1)
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])
        u = u.to(device=cdf.device, dtype=dtype).clamp_min(torch.finfo(dtype).tiny)
        # the first token whose cumulative probability reaches u * total: a token of positive probability
        token = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).clamp_max(x.shape[-1] - 1)
        return torch.full_like(x, float("-inf")).scatter_(-1, token, 0.0)


def _fit_context(handle, texts: list[str], *, thinking_phase: bool, closes: bool, enable_thinking: bool,
                 system: str | None, max_think: int, max_answer: int) -> dict[int, dict[str, int]]:
    """Budgets of the prompts that do not fit the model's context with ``max_think`` + ``max_answer`` new tokens:
    ``{prompt index: {"n_ctx", "prompt_tokens", "max_think_tokens", "max_answer_tokens"}}`` (a warning names
    them); a prompt that leaves no room for one answer token raises MechcliffError. ``prompt_tokens`` counts the
    chat template and, when thinking, the opener and closing template."""
    n_ctx = getattr(handle, "n_ctx", None)
    if not isinstance(n_ctx, int):
        return {}
    base = encode(handle, texts, thinking=[""] * len(texts) if closes else None, enable_thinking=enable_thinking,
                  system=system, check_context=False).attention_mask.sum(1).tolist()
    think = max_think if thinking_phase else 0
    no_room = [i for i, n in enumerate(base) if n + min(max_answer, 1) > n_ctx]
    if no_room:
        listed = "; ".join(f"prompt {i} is {base[i]} tokens" for i in no_room[:5])
        more = f" and {len(no_room) - 5} more" if len(no_room) > 5 else ""
        raise MechcliffError(
            f"{listed}{more} with its chat template{' and think tags' if closes else ''}, which leaves no room for an "
            f"answer in the model's context of {n_ctx} tokens (checked before generating anything). Prompts are "
            "never truncated (a cut prompt is another prompt): shorten or drop "
            f"{'it' if len(no_room) == 1 else 'them'}")
    caps: dict[int, dict[str, int]] = {}
    for i, n in enumerate(base):
        if n + think + max_answer > n_ctx:
            answer = min(max_answer, n_ctx - n)
            caps[i] = {"n_ctx": n_ctx, "prompt_tokens": n, "max_think_tokens": min(think, n_ctx - n - answer),
                       "max_answer_tokens": answer}
    if caps:
        tags = " with its chat template and think tags" if closes else " with its chat template"
        listed = "; ".join(
            f"prompt {i} ({c['prompt_tokens']} tokens{tags} + thinking {think} + answer {max_answer} > {n_ctx}: "
            f"thinking budget {c['max_think_tokens']}, answer budget {c['max_answer_tokens']})"
            for i, c in list(caps.items())[:5])
        more = f"; and {len(caps) - 5} more" if len(caps) > 5 else ""
        warnings.warn(
            f"{len(caps)} of {len(texts)} prompts do not fit the model's context of {n_ctx} tokens with "
            f"max_think_tokens={max_think} and max_answer_tokens={max_answer}: {listed}{more}. Prompts are never "
            "truncated; the thinking budget is cut first, then the answer budget, so that prompt + thinking + "
            "closing + answer fits. These rollouts record it in meta['context_capped'] and are generated in "
            "batches of their own.", ContextLengthWarning, stacklevel=3)
    return caps


def _eos_ids(tok) -> list[int]:
    ids = []
    for t in (tok.eos_token, "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>"):
        if t is None:
            continue
        tid = tok.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


def _generate(handle, batch, max_new: int, temperature: float, stop_ids: list[int], stop_strings: list[str] | None,
              *, top_p: float = 1.0, generators: list[torch.Generator] | None = None):
    """New tokens of ``batch`` (on the CPU). Greedy for ``temperature == 0``; otherwise greedy decoding through
    :class:`SeededSampler` with one generator per row (``generators``, :meth:`Sampling.generator`). Generation
    draws no random numbers of its own, so the caller's RNG is untouched."""
    kwargs: dict[str, Any] = dict(
        attention_mask=to_device(handle, batch.attention_mask), max_new_tokens=max_new, eos_token_id=stop_ids,
        pad_token_id=handle.tokenizer.pad_token_id, do_sample=False, temperature=None, top_p=None, top_k=None,
    )
    if temperature > 0:
        from transformers import LogitsProcessorList

        if generators is None:
            raise MechcliffError("sampling (temperature > 0) needs a generator per row (Sampling.generator)")
        kwargs["logits_processor"] = LogitsProcessorList([SeededSampler(generators, temperature, top_p)])
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=handle.tokenizer)
    with torch.no_grad():
        out = handle.hf_model.generate(to_device(handle, batch.tokens), **kwargs)
    return out[:, batch.tokens.shape[1]:].cpu()


def _decode(tok, ids: torch.Tensor, stop_ids: list[int]) -> tuple[str, bool]:
    """Decode one row of new tokens, cutting at the first stop token; return (text, hit_eos)."""
    row = ids.tolist()
    hit = False
    for j, t in enumerate(row):
        if t in stop_ids:
            row, hit = row[:j], True
            break
    row = [t for t in row if t != tok.pad_token_id]
    return tok.decode(row, skip_special_tokens=False).strip(), hit


def generate_rollouts(
    handle,
    prompts: list[Prompt] | list[str],
    *,
    max_think_tokens: int | None = None,
    max_answer_tokens: int | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    top_p: float = 1.0,
    n_samples: int = 1,
    sampling: Sampling | None = None,
    batch_size: int = 16,
    enable_thinking: bool = True,
    omit_thinking: bool = False,
    system: str | None = None,
    progress: bool = True,
    desc: str = "generating",
    done: dict[int, Rollout] | None = None,
    on_batch: Callable[[list[tuple[int, Rollout]]], None] | None = None,
) -> list[Rollout]:
    """Generate thinking + answer for each prompt; returns :class:`~mechcliff.data.Rollout` objects in order.

    Sampling (:class:`Sampling`; ``temperature``, ``top_p``, ``n_samples``, ``seed``, or ``sampling=`` instead of
    those four): ``n_samples`` rollouts per prompt, prompt-major (prompt 0's samples 0..n-1, then prompt 1's, ...),
    each with ``meta["prompt_index"]`` and ``meta["sample"]``; sample k of prompt i is seeded from ``(seed, i, k)``
    and is the same whatever ``batch_size`` and the other prompts (see the module docstring). Every rollout's
    ``meta`` records ``temperature``, ``top_p`` and ``seed``.

    Resuming: ``on_batch(pairs)`` is called with ``(rollout index, rollout)`` pairs as each batch finishes (e.g. to
    append them to a file; the rollout index is ``prompt index * n_samples + sample``, the prompt index when
    ``n_samples == 1``), and ``done`` maps rollout indices to rollouts kept from an interrupted call with the same
    prompts and settings: a batch whose every rollout is in ``done`` is not generated again. A resumed call returns
    what an uninterrupted one would.

    ``max_think_tokens=0`` (with thinking on) gives every rollout an empty, closed thinking (``thinking == ""``):
    the closing template is prefilled and the model answers directly after it. ``enable_thinking=False`` is a
    different mode: no think block of ours (``thinking is None``; the chat template decides, e.g. Qwen3 writes
    an empty one). ``omit_thinking=True`` writes no think block at all, whatever the template's thinking switch
    (``thinking is None``, the answer follows the generation prompt; ``max_think_tokens`` is then unused).

    The answer (``response``) is what the model wrote after the closing template. Should the model write think
    tags in it anyway, the text after the last ``</think>`` is its final answer (cut at a ``<think>`` it never
    closes, see :func:`mechcliff.judges.final_answer`): ``response`` holds that final answer and
    ``meta["raw_response"]`` the full text as generated (only present when the two differ).

    The model's context (``handle.n_ctx``) is never exceeded and prompts are never truncated: a prompt too long
    for the context raises :class:`~mechcliff.errors.MechcliffError` before anything is generated, and a prompt
    that fits only with smaller budgets gets them (thinking budget first, then the answer budget), with a
    :class:`ContextLengthWarning` naming it and ``meta["context_capped"] = {"n_ctx", "prompt_tokens",
    "max_think_tokens", "max_answer_tokens"}`` (see the module docstring).

    Args:
        handle: the loaded model (:func:`mechcliff.load_model`).
        prompts: :class:`~mechcliff.data.Prompt` objects (their group, category and id are kept) or plain strings.
        max_think_tokens: budget of the thinking; 0 = an empty, closed thinking (above). None (default): the
            model's preset (:func:`mechcliff.model.presets.generation_budgets` of ``handle.model_id``): 4,096 on
            real models (reasoning-scale: a shorter budget force-closes a real model's thinking, which changes the
            behaviour under study), 64 on the organisms (``"organism"``, ``"smollm2-refusal-organism"``).
        max_answer_tokens: budget of the answer. None (default): the model's preset: 512 on real models, 48 on
            the organisms.
        temperature: 0 (default) is greedy; above 0, sampling (arXiv 2510.06036: 0.7).
        seed: seed of the sampling (each sample gets its own seed derived from it, the prompt and sample index).
        top_p: nucleus sampling's probability mass (1, the default: none); unused when greedy.
        n_samples: rollouts per prompt (above 1 needs ``temperature > 0``).
        sampling: a :class:`Sampling` instead of ``temperature``, ``seed``, ``top_p`` and ``n_samples``.
        batch_size: rows (prompt samples) per generation batch (batched by prompt length).
        enable_thinking: the chat template's thinking switch (above).
        omit_thinking: write no think block at all (above).
        system: a system message, or None.
        progress: show a progress bar.
        desc: the progress bar's label.
        done: rollout index -> rollout already generated, for resuming (above).
        on_batch: called with the ``(rollout index, rollout)`` pairs of each finished batch (above).
    """
    from mechcliff.model.presets import generation_budgets

    max_think_tokens, max_answer_tokens = generation_budgets(handle, max_think_tokens, max_answer_tokens)
    if max_think_tokens < 0:
        raise MechcliffError(f"max_think_tokens must be an integer >= 0, got {max_think_tokens!r}")
    if sampling is None:
        sampling = Sampling(temperature=temperature, top_p=top_p, n=n_samples, seed=seed)
    elif (temperature, top_p, n_samples, seed) != (0.0, 1.0, 1, 0):
        raise MechcliffError("give either sampling= or temperature / top_p / n_samples / seed, not both")
    elif not isinstance(sampling, Sampling):
        raise MechcliffError(f"sampling must be a mechcliff.generation.Sampling, got {type(sampling).__name__}")
    items = [p if isinstance(p, Prompt) else Prompt(text=p) for p in prompts]
    if not items:
        raise MechcliffError("no prompts to generate from (empty prompt set)")
    tok, fmt = handle.tokenizer, handle.think
    eos = _eos_ids(tok)
    close_ids = tok(fmt.close_tag, add_special_tokens=False)["input_ids"]
    think_stop = eos + (close_ids if len(close_ids) == 1 else [])
    think_strings = None if len(close_ids) == 1 else [fmt.close_tag]
    closes = enable_thinking and not omit_thinking  # a think block of ours, closed by the closing template
    caps = _fit_context(handle, [p.text for p in items], thinking_phase=closes and max_think_tokens > 0,
                        closes=closes, enable_thinking=enable_thinking, system=system,
                        max_think=max_think_tokens, max_answer=max_answer_tokens)
    n = sampling.n
    # Rows are (prompt index, sample index), batched by prompt length; a sample's tokens do not depend on its batch.
    order = sorted(((i, k) for i in range(len(items)) if i not in caps for k in range(n)),
                   key=lambda r: (len(items[r[0]].text), r))
    out: list[Rollout | None] = [None] * (len(items) * n)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for i in sorted(caps, key=lambda i: len(items[i].text)):  # cut budgets: batches of their own
        batches += [[(i, k) for k in range(k0, min(n, k0 + batch_size))] for k0 in range(0, n, batch_size)]
    n_ctx = getattr(handle, "n_ctx", None)
    done = done or {}
    for idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
        flat = [i * n + k for i, k in idx]
        if all(f in done for f in flat):
            for f in flat:
                out[f] = done[f]
            continue
        texts = [items[i].text for i, _ in idx]
        cap = caps.get(idx[0][0])  # a prompt with cut budgets shares its batches with no other prompt
        think_budget = cap["max_think_tokens"] if cap else max_think_tokens
        answer_budget = cap["max_answer_tokens"] if cap else max_answer_tokens

        def generators(phase: int, idx: list[tuple[int, int]] = idx) -> list[torch.Generator] | None:
            return None if sampling.greedy else [sampling.generator(i, k, phase) for i, k in idx]

        # Thinking off: no think block (the template decides). A zero budget: an empty, closed thinking, so the
        # model answers right after the closing template (it must not do its thinking inside the answer).
        thinks: list[str | None] = [None if omit_thinking or not enable_thinking else ""] * len(idx)
        closed_by_model = [False] * len(idx)
        if closes and think_budget > 0:
            batch = encode(handle, texts, enable_thinking=True, system=system, open_thinking=True)
            new = _generate(handle, batch, think_budget, sampling.temperature, think_stop, think_strings,
                            top_p=sampling.top_p, generators=generators(0))
            for j in range(len(idx)):
                text, _ = _decode(tok, new[j], eos)
                if fmt.close_tag in text:
                    text, closed_by_model[j] = text.split(fmt.close_tag, 1)[0], True
                thinks[j] = text.replace(fmt.open_tag, "").strip()
        # Re-encoding decoded thinking can (rarely) take more tokens than were generated: never pass the context.
        batch = encode(handle, texts, thinking=thinks, enable_thinking=enable_thinking, system=system,
                       check_context=False)
        if isinstance(n_ctx, int):
            answer_budget = max(0, min(answer_budget, n_ctx - batch.tokens.shape[1]))
        if answer_budget > 0:
            new = _generate(handle, batch, answer_budget, sampling.temperature, eos, None,
                            top_p=sampling.top_p, generators=generators(1))
        else:
            new = torch.full((len(idx), 0), tok.pad_token_id or 0, dtype=torch.long)
        for j, (i, k) in enumerate(idx):
            raw, ended = _decode(tok, new[j], eos)
            answer = final_answer(raw, fmt.close_tag, fmt.open_tag)  # think tags in the answer are not the answer
            p = items[i]
            meta: dict[str, Any] = {"closed_by_model": closed_by_model[j], "answer_ended": ended,
                                    "temperature": sampling.temperature, "top_p": sampling.top_p,
                                    "seed": sampling.seed, "prompt_index": i, "sample": k,
                                    "enable_thinking": enable_thinking}
            if answer != raw:
                meta["raw_response"] = raw
            if (fmt.open_tag, fmt.close_tag) != ("<think>", "</think>"):  # judged with these (mechcliff.asr)
                meta["think_tags"] = [fmt.open_tag, fmt.close_tag]
            if i in caps:
                meta["context_capped"] = dict(caps[i])
            out[i * n + k] = Rollout(
                prompt=p.text, thinking=thinks[j], response=answer, category=p.category, group=p.group, id=p.id,
                has_think_close=True, meta=meta,
            )
        if on_batch is not None:
            on_batch([(f, out[f]) for f in flat])
    return [r for r in out if r is not None]


def encode_rollouts(handle, rollouts: list[Rollout], *, enable_thinking: bool = True, system: str | None = None):
    """Encode rollouts (prompt, thinking, answer) with token-exact spans; see :func:`mechcliff.chat.encode`."""
    return encode(
        handle, [r.prompt for r in rollouts], thinking=[r.thinking for r in rollouts],
        answers=[r.response for r in rollouts], has_think_close=[r.has_think_close for r in rollouts],
        enable_thinking=enable_thinking, system=system,
    )
