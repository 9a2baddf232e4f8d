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

Greedy decoding by default (``temperature=0``); sampling is seeded per batch. Batches are left-padded with an
attention mask, so greedy batched output equals one-at-a-time output (a test checks this).

**The model's context** (``handle.n_ctx``) bounds prompt + thinking + closing template + answer. Prompts are never
truncated (a cut prompt is another prompt). Before anything is generated, every prompt is measured: one that
leaves no room for a single answer token raises :class:`~mechcliff.errors.MechcliffError` naming it and its
length; for one that fits but not with the full budgets, the thinking budget is cut first, then the answer budget,
so that the whole sequence fits (a :class:`ContextLengthWarning` names each such prompt, its length, the budgets
and the context; ``meta["context_capped"]`` records them). Those prompts are generated in batches of their own, so
the other prompts' rollouts are exactly what they would be without them.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from mechcliff.chat import encode
from mechcliff.data import Prompt, Rollout
from mechcliff.errors import MechcliffError
from mechcliff.judges import final_answer
from mechcliff.model.capture import to_device


class ContextLengthWarning(UserWarning):
    """Some prompts fit the model's context only with smaller thinking / answer budgets (see the module docstring)."""


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
              seed: int = 0):
    kwargs = dict(
        attention_mask=to_device(handle, batch.attention_mask), max_new_tokens=max_new, eos_token_id=stop_ids,
        pad_token_id=handle.tokenizer.pad_token_id, do_sample=temperature > 0,
    )
    if temperature > 0:
        kwargs["temperature"] = temperature
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=handle.tokenizer)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # seeded per batch; the caller's RNG is untouched
        torch.manual_seed(seed)
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
    max_think_tokens: int = 64,
    max_answer_tokens: int = 48,
    temperature: float = 0.0,
    seed: int = 0,
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

    Resuming: ``on_batch(pairs)`` is called with ``(prompt index, rollout)`` pairs as each batch finishes (e.g. to
    append them to a file), and ``done`` maps prompt indices to rollouts kept from an interrupted call with the same
    prompts and settings: a batch whose every prompt is in ``done`` is not generated again. Batches and their seeds
    depend only on the prompts and ``batch_size``, so a resumed call returns what an uninterrupted one would.

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
        max_think_tokens: budget of the thinking; 0 = an empty, closed thinking (above).
        max_answer_tokens: budget of the answer.
        temperature: 0 (default) is greedy; above 0, sampling, seeded per batch.
        seed: seed of the sampling (each batch gets its own seed derived from it).
        batch_size: prompts per generation batch (prompts are batched by length).
        enable_thinking: the chat template's thinking switch (above).
        omit_thinking: write no think block at all (above).
        system: a system message, or None.
        progress: show a progress bar.
        desc: the progress bar's label.
        done: prompt index -> rollout already generated, for resuming (above).
        on_batch: called with the ``(prompt index, rollout)`` pairs of each finished batch (above).
    """
    if max_think_tokens < 0:
        raise MechcliffError(f"max_think_tokens must be an integer >= 0, got {max_think_tokens!r}")
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
    order = sorted((i for i in range(len(items)) if i not in caps), key=lambda i: len(items[i].text))
    out: list[Rollout | None] = [None] * len(items)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches += [[i] for i in sorted(caps, key=lambda i: len(items[i].text))]  # cut budgets: a batch of their own
    n_ctx = getattr(handle, "n_ctx", None)
    done = done or {}
    for bi, idx in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
        if all(i in done for i in idx):
            for i in idx:
                out[i] = done[i]
            continue
        batch_seed = seed * 100003 + bi
        texts = [items[i].text for i in idx]
        cap = caps.get(idx[0]) if len(idx) == 1 else None
        think_budget = cap["max_think_tokens"] if cap else max_think_tokens
        answer_budget = cap["max_answer_tokens"] if cap else max_answer_tokens
        # Thinking off: no think block (the template decides). A zero budget: an empty, closed thinking, so the
        # model answers right after the closing template (it must not do its thinking inside the answer).
        thinks: list[str | None] = [None if omit_thinking or not enable_thinking else ""] * len(idx)
        closed_by_model = [False] * len(idx)
        if closes and think_budget > 0:
            batch = encode(handle, texts, enable_thinking=True, system=system, open_thinking=True)
            new = _generate(handle, batch, think_budget, temperature, think_stop, think_strings, batch_seed)
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
            new = _generate(handle, batch, answer_budget, temperature, eos, None, batch_seed + 1)
        else:
            new = torch.full((len(idx), 0), tok.pad_token_id or 0, dtype=torch.long)
        for j, i in enumerate(idx):
            raw, ended = _decode(tok, new[j], eos)
            answer = final_answer(raw, fmt.close_tag, fmt.open_tag)  # think tags in the answer are not the answer
            p = items[i]
            meta: dict[str, Any] = {"closed_by_model": closed_by_model[j], "answer_ended": ended,
                                    "temperature": temperature, "seed": seed, "enable_thinking": enable_thinking}
            if answer != raw:
                meta["raw_response"] = raw
            if (fmt.open_tag, fmt.close_tag) != ("<think>", "</think>"):  # judged with these (mechcliff.asr)
                meta["think_tags"] = [fmt.open_tag, fmt.close_tag]
            if i in caps:
                meta["context_capped"] = dict(caps[i])
            out[i] = Rollout(
                prompt=p.text, thinking=thinks[j], response=answer, category=p.category, group=p.group, id=p.id,
                has_think_close=True, meta=meta,
            )
        if on_batch is not None:
            on_batch([(i, out[i]) for i in idx])
    return [r for r in out if r is not None]


def encode_rollouts(handle, rollouts: list[Rollout], *, enable_thinking: bool = True, system: str | None = None):
    """Encode rollouts (prompt, thinking, answer) with token-exact spans; see :func:`mechcliff.chat.encode`."""
    return encode(
        handle, [r.prompt for r in rollouts], thinking=[r.thinking for r in rollouts],
        answers=[r.response for r in rollouts], has_think_close=[r.has_think_close for r in rollouts],
        enable_thinking=enable_thinking, system=system,
    )
