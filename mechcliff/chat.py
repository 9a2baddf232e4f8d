"""Chat formatting with token-exact segments (prompt / thinking / closing template / answer).

The prompt is rendered with the tokenizer's own chat template (``apply_chat_template``, passing
``enable_thinking`` so that templates which know it, such as Qwen3's, switch thinking on or off). The assistant
turn is then written as ``opener + thinking + closer + answer`` using the model's :class:`ThinkFormat` (default
``"<think>\\n"``, ``"\\n</think>\\n\\n"``; templates that do not mention thinking, such as SmolLM2's, get this
documented default). Each segment is tokenized on its own (``add_special_tokens=False``) and the ids are
concatenated, so segment boundaries are token-exact by construction; the prompt's span inside the rendered
template is found from the tokenizer's offsets. Exactly one BOS is guaranteed (TransformerLens #1418). Batches
are left-padded with an attention mask; all spans are in padded coordinates.

Anchors (per example, ``-1`` where absent):

* ``think_end`` -- last token of the closing template, i.e. the token right before the first answer token (the
  paper's probe position). Without any thinking block it is the last token of the generation prompt; for a
  rollout whose thinking never closed (no ``</think>``) it is ``-1``: such rows are kept and marked, never
  silently mis-segmented.
* ``think_close`` -- first token of the closing template (where ``</think>`` starts).
* ``prompt_end`` -- last token of the rendered generation prompt; ``answer_start`` -- first answer token;
  ``last`` -- last real token.

The model's context (``handle.n_ctx``: ``max_position_embeddings``) is a hard limit: a sequence longer than it is
refused with a :class:`~mechcliff.errors.MechcliffError` naming the example and its lengths, before any forward
pass. Nothing is truncated: a prompt cut to fit is another prompt (it may lose the request or the jailbreak frame),
and a thinking cut to fit moves ``think_end``. :func:`mechcliff.generation.generate_rollouts` fits its thinking and
answer budgets to the context, so its rollouts always encode.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from jaxtyping import Bool, Int

from mechcliff.errors import MechcliffError

if TYPE_CHECKING:
    from mechcliff.model.handle import ModelHandle

ANCHORS = ("think_end", "think_close", "prompt_end", "answer_start", "last")
SEGMENTS = ("prefix", "prompt", "thinking", "closing", "answer")
PLACEHOLDER = "\u2063MECHCLIFF_PROMPT\u2063"


@dataclass
class EncodedBatch:
    """Left-padded token ids, attention mask and per-example token spans ``[start, end)``."""

    tokens: Int[torch.Tensor, "batch pos"]
    attention_mask: Int[torch.Tensor, "batch pos"]
    spans: list[dict[str, tuple[int, int]]]
    has_think_close: list[bool]
    pad_lengths: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def position(self, anchor: "str | int | Sequence[int] | torch.Tensor") -> Int[torch.Tensor, " batch"]:
        """Per-example positions for a named anchor, an int (relative to each example's first real token; negative
        counts back from its last token), or an explicit per-example index tensor (padded coordinates)."""
        b = len(self)
        if isinstance(anchor, torch.Tensor) or (isinstance(anchor, (list, tuple)) and not isinstance(anchor, str)):
            pos = torch.as_tensor(anchor, dtype=torch.long)
            if pos.shape != (b,):
                raise MechcliffError(f"a per-example position needs one index per example ({b}), got {tuple(pos.shape)}")
            return pos
        if isinstance(anchor, int):
            out = []
            for i in range(b):
                start, end = self.pad_lengths[i], self.tokens.shape[1]
                p = start + anchor if anchor >= 0 else end + anchor
                out.append(p if start <= p < end else -1)
            return torch.tensor(out, dtype=torch.long)
        if anchor not in ANCHORS:
            raise MechcliffError(f"unknown position anchor {anchor!r}; use one of {', '.join(ANCHORS)}, an int or a tensor")
        out = []
        for i, sp in enumerate(self.spans):
            if anchor == "last":
                out.append(self.tokens.shape[1] - 1)
            elif anchor == "prompt_end":
                out.append(sp["prefix"][1] - 1)
            elif anchor == "answer_start":
                a0, a1 = sp["answer"]
                out.append(a0 if a1 > a0 else -1)
            elif not self.has_think_close[i]:
                out.append(-1)
            elif anchor == "think_close":
                c0, c1 = sp["closing"]
                out.append(c0 if c1 > c0 else sp["prefix"][1] - 1)
            else:  # think_end
                c0, c1 = sp["closing"]
                out.append(c1 - 1 if c1 > c0 else sp["prefix"][1] - 1)
        return torch.tensor(out, dtype=torch.long)

    def require(self, anchor: "str | int | Sequence[int] | torch.Tensor", what: str = "the requested position"
                ) -> Int[torch.Tensor, " batch"]:
        """:meth:`position`, refusing a batch in which some example lacks it (e.g. a thinking that never closed)."""
        pos = self.position(anchor)
        missing = (pos < 0).nonzero().flatten().tolist()
        if missing:
            raise MechcliffError(
                f"{len(missing)} example(s) lack {what} ({anchor!r} if a name; e.g. example {missing[0]}: a thinking "
                "that never closed); use position='last' or drop them first"
            )
        return pos

    def __getitem__(self, index: "int | slice | Sequence[int] | torch.Tensor") -> "EncodedBatch":
        """The examples ``index`` (a slice, indices or a boolean mask) as a batch, with the same padded length."""
        if isinstance(index, int):
            index = [index]
        if isinstance(index, slice):
            rows = list(range(len(self)))[index]
        else:
            t = torch.as_tensor(index)
            rows = (t.nonzero().flatten() if t.dtype == torch.bool else t.reshape(-1)).tolist()
        idx = torch.tensor(rows, dtype=torch.long)
        return EncodedBatch(
            tokens=self.tokens[idx], attention_mask=self.attention_mask[idx], spans=[self.spans[i] for i in rows],
            has_think_close=[self.has_think_close[i] for i in rows],
            pad_lengths=[self.pad_lengths[i] for i in rows] if self.pad_lengths else [],
        )

    def chunks(self, size: int) -> "Iterator[EncodedBatch]":
        """Consecutive sub-batches of at most ``size`` examples."""
        if int(size) < 1:
            raise MechcliffError(f"a chunk needs at least one example, got size={size}")
        for s in range(0, len(self), int(size)):
            yield self[s:s + int(size)]

    def to(self, device: "torch.device | str") -> "EncodedBatch":
        """The same batch with its tensors on ``device`` (spans stay host-side lists)."""
        return dataclasses.replace(self, tokens=self.tokens.to(device), attention_mask=self.attention_mask.to(device))

    def segment_mask(self, name: str) -> Bool[torch.Tensor, "batch pos"]:
        if name not in SEGMENTS:
            raise MechcliffError(f"unknown segment {name!r}; use one of {', '.join(SEGMENTS)}")
        mask = torch.zeros_like(self.tokens, dtype=torch.bool)
        for i, sp in enumerate(self.spans):
            s, e = sp[name]
            mask[i, s:e] = True
        return mask

    def row(self, i: int) -> list[int]:
        """Token ids of example ``i`` without padding."""
        return self.tokens[i, self.pad_lengths[i]:].tolist()


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def render_prompt(tokenizer: Any, prompt: str, *, enable_thinking: bool = True, system: str | None = None) -> str:
    """The generation prompt from the tokenizer's own chat template (a plain default when it has none)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
        )
    # Documented default for tokenizers without a chat template.
    sys_part = f"System: {system}\n\n" if system else ""
    return f"{sys_part}User: {prompt}\n\nAssistant:"


def _ensure_one_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    bos = tokenizer.bos_token_id
    if bos is None:
        return ids
    n_lead = 0
    while n_lead < len(ids) and ids[n_lead] == bos:
        n_lead += 1
    if n_lead > 1:
        return ids[n_lead - 1:]
    if n_lead == 0:
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        if probe and probe[0] == bos:  # this tokenizer expects a BOS the template did not write
            return [bos] + ids
    return ids


def encode(
    handle: ModelHandle,
    prompts: Sequence[str],
    *,
    thinking: Sequence[str | None] | None = None,
    answers: Sequence[str | None] | None = None,
    enable_thinking: bool = True,
    system: str | None = None,
    has_think_close: Sequence[bool] | None = None,
    open_thinking: bool = False,
    check_context: bool = True,
) -> EncodedBatch:
    """Encode prompts (and optionally their thinking and answers) into a left-padded batch with token spans.

    ``thinking[i] is None`` means no thinking block. ``has_think_close[i] = False`` marks a rollout whose
    thinking never closed: the thinking is encoded, no closing template is added, and ``think_end`` is ``-1``.
    ``open_thinking=True`` (used for generation) ends each sequence with the opener so the model starts
    thinking.

    A sequence (prompt with its chat template + think block + answer) longer than the model's context
    (``handle.n_ctx``) raises :class:`~mechcliff.errors.MechcliffError` naming each such example (its index in
    ``prompts``) and its lengths; nothing is truncated (see the module docstring). ``check_context=False`` skips
    this check (generation measures prompts with it and fits its budgets itself).

    Args:
        handle: the loaded model (:func:`mechcliff.load_model`); its tokenizer and think format are used.
        prompts: the user prompts (non-empty strings).
        thinking: per prompt, its thinking text, or None for no thinking block (default: none).
        answers: per prompt, its answer text, or None for no answer (default: none).
        enable_thinking: the chat template's thinking switch (``enable_thinking`` of ``apply_chat_template``).
        system: a system message, or None.
        has_think_close: per prompt, False for a thinking that never closed (above); default all True.
        open_thinking: end each sequence with the think opener (generation prompts, above).
        check_context: refuse sequences longer than the model's context (above).
    """
    tok, fmt = handle.tokenizer, handle.think
    n = len(prompts)
    if n == 0:
        raise MechcliffError("no prompts to encode (empty prompt set)")
    thinking = list(thinking) if thinking is not None else [None] * n
    answers = list(answers) if answers is not None else [None] * n
    closed = list(has_think_close) if has_think_close is not None else [True] * n
    if not (len(thinking) == len(answers) == len(closed) == n):
        raise MechcliffError("prompts, thinking, answers and has_think_close must have the same length")
    rows: list[list[int]] = []
    spans: list[dict[str, tuple[int, int]]] = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise MechcliffError(f"prompt {i} is empty or not a string")
        prefix_text = render_prompt(tok, prompt, enable_thinking=enable_thinking, system=system)
        # Locate the prompt by rendering a unique placeholder in its place (the text may recur in the template).
        marked = render_prompt(tok, PLACEHOLDER, enable_thinking=enable_thinking, system=system)
        c0 = marked.find(PLACEHOLDER)
        if c0 < 0 or prefix_text[c0:c0 + len(prompt)] != prompt:
            c0 = prefix_text.rfind(prompt)
        enc = tok(prefix_text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = list(enc["offset_mapping"])
        fixed = _ensure_one_bos(tok, ids)
        shift = len(fixed) - len(ids)
        ids = fixed
        p_tokens = [j + shift for j, (s, e) in enumerate(offsets) if e > s and c0 <= s < c0 + len(prompt)]
        prompt_span = (min(p_tokens), max(p_tokens) + 1) if p_tokens and c0 >= 0 else (0, 0)
        sp: dict[str, tuple[int, int]] = {"prefix": (0, len(ids)), "prompt": prompt_span}
        # Where the template already opened (or opened and closed) the thinking block.
        stripped = prefix_text.rstrip()
        template_closed = stripped.endswith(fmt.close_tag)
        template_opened = stripped.endswith(fmt.open_tag)
        think_ids: list[int] = []
        close_span = (len(ids), len(ids))
        if template_closed:  # e.g. Qwen3 with enable_thinking=False writes an empty think block
            cpos = prefix_text.rfind(fmt.close_tag)
            j0 = next((j + shift for j, (s, e) in enumerate(offsets) if e > cpos), len(ids))
            close_span = (j0, len(ids))
            sp["thinking"] = (j0, j0)
        elif thinking[i] is not None or (open_thinking and enable_thinking):
            if not template_opened:
                ids += _ids(tok, fmt.opener)
            t0 = len(ids)
            think_ids = _ids(tok, thinking[i] or "")
            ids += think_ids
            sp["thinking"] = (t0, len(ids))
            if thinking[i] is not None and closed[i]:
                ids += _ids(tok, fmt.closer)
                close_span = (sp["thinking"][1], len(ids))
        else:
            sp["thinking"] = (len(ids), len(ids))
        sp["closing"] = close_span
        a0 = len(ids)
        ids += _ids(tok, answers[i] or "")
        sp["answer"] = (a0, len(ids))
        rows.append(ids)
        spans.append(sp)
    n_ctx = getattr(handle, "n_ctx", None) if check_context else None
    if isinstance(n_ctx, int):
        _check_context(rows, spans, n_ctx)
    width = max(len(r) for r in rows)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    tokens = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    pads = []
    for i, (r, sp) in enumerate(zip(rows, spans)):
        pad = width - len(r)
        tokens[i, pad:] = torch.tensor(r, dtype=torch.long)
        mask[i, pad:] = 1
        pads.append(pad)
        for k, (s, e) in sp.items():
            sp[k] = (s + pad, e + pad)
    return EncodedBatch(tokens=tokens, attention_mask=mask, spans=spans, has_think_close=closed, pad_lengths=pads)


def _check_context(rows: list[list[int]], spans: list[dict[str, tuple[int, int]]], n_ctx: int) -> None:
    """Raise a MechcliffError naming every sequence longer than ``n_ctx`` tokens (lengths of its parts)."""
    long = [i for i, r in enumerate(rows) if len(r) > n_ctx]
    if not long:
        return
    parts = []
    for i in long[:5]:
        sp, p = spans[i], spans[i]["prefix"][1]
        a0, a1 = sp["answer"]
        parts.append(f"example {i} is {len(rows[i])} tokens (prompt with its chat template {p}, think block "
                     f"{a0 - p}, answer {a1 - a0})")
    more = f" and {len(long) - 5} more" if len(long) > 5 else ""
    raise MechcliffError(
        f"{'; '.join(parts)}{more}: longer than the model's context of {n_ctx} tokens. mechcliff never truncates a "
        "sequence (a cut prompt or thinking is another example): shorten or drop "
        f"{'it' if len(long) == 1 else 'them'} (generate_rollouts fits its thinking and answer budgets to the context)"
    )
