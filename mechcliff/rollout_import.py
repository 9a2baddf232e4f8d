"""Rollouts written elsewhere, read into mechcliff :class:`~mechcliff.data.Rollout` s, with a report of what was not.

Content warning: rollout sets such as STAR-1 hold requests for harmful content (their answers refuse or answer safely).

:func:`import_rollouts` reads a JSONL file (or a JSON list, or one JSON object) of records in one of these formats
(``format="auto"`` recognises each record by its keys):

``vllm``
    vLLM's offline outputs: ``{"prompt", "outputs": [{"text", "finish_reason", ...}, ...]}`` (one rollout per
    output) or ``{"prompt", "text"}``. A prompt that went through a chat template (ChatML ``<|im_start|>`` or
    DeepSeek's ``<｜User｜>`` / ``<｜Assistant｜>``) is cut back to its last user message; the templated text is kept in
    ``meta["raw_prompt"]``. A templated prompt that ends with the think opener (the R1 templates prefill
    ``<think>``) means the generation starts inside the thinking.
``openai``
    An OpenAI-compatible chat-completions exchange: the request's ``messages`` and the response's
    ``choices[k].message`` (``content``, and ``reasoning_content`` or ``reasoning`` where the server separates the
    thinking), flat (``{"messages", "choices"}``), nested (``{"request": {...}, "response": {...}}``, or a batch
    output's ``response.body``), or a chat transcript whose last message is the assistant's. The prompt is the last
    user message; a system message is kept in ``meta["system"]`` and earlier turns in ``meta["messages"]``.
``hf``
    Hugging Face datasets style: a prompt in ``prompt`` / ``question`` / ``instruction`` (plus ``input``, appended
    after a blank line, as Alpaca writes it) and the generation in ``response`` / ``output`` / ``completion`` /
    ``answer``; a separate ``reasoning`` / ``reasoning_content`` / ``thinking`` field is the thinking.
``mechcliff``
    mechcliff's own format (:func:`mechcliff.data.load_rollouts`), with its aliases.
``star1``
    STAR-1 (arXiv 2504.01903): ``{id, question, response, category (a list), source, score}``; the group defaults
    to ``"harmful"`` (the questions are harmful or borderline requests), the category is the first of the list and
    the whole list is kept in ``meta["categories"]``.

Thinking and answer are split at the think format's tags (:func:`mechcliff.data.split_thinking`): at the first close
tag, with a leading open tag dropped (it is often absent: R1 templates prefill it). A thinking that never closed is
kept and marked (``has_think_close=False``, empty answer); a text with neither tag has no thinking. A separate
reasoning field is the thinking as it stands (closed, unless the answer is empty because the generation stopped on
its length). The fields of a record that are not read are kept in ``meta``; ``meta["import"]`` says where each
rollout came from (file, line, record, format).

Nothing is dropped silently: a record that cannot be imported (invalid JSON line, no prompt, no generation, ...) is
listed in :attr:`ImportReport.skipped` with its record number (0-based, over the file's records) and line.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechcliff.data import ROLLOUT_ALIASES, Rollout, _json_element_lines, _read_text, split_thinking
from mechcliff.errors import MechcliffError
from mechcliff.model.handle import ThinkFormat, think_format

__all__ = ["FORMATS", "IMPORT_REPORT", "ImportReport", "ImportedRollouts", "Skipped", "detect_format",
           "import_rollouts", "read_records", "save_import"]

IMPORT_REPORT = "import_report.json"
"""The report :func:`save_import` writes into a run folder (beside ``rollouts/<group>.jsonl``)."""

FORMATS: tuple[str, ...] = ("auto", "vllm", "openai", "hf", "mechcliff", "star1")
"""The ``format`` values :func:`import_rollouts` takes."""

HF_PROMPT_KEYS: tuple[str, ...] = ("prompt", "question", "instruction")
HF_RESPONSE_KEYS: tuple[str, ...] = ("response", "output", "completion", "answer")
REASONING_KEYS: tuple[str, ...] = ("reasoning_content", "reasoning", "thinking")
STAR1_KEYS = frozenset({"id", "question", "response", "category", "source", "score"})

#: Default group of a format whose records are all of one kind.
DEFAULT_GROUPS: dict[str, str] = {"star1": "harmful"}


@dataclass
class Skipped:
    """A record that was not imported: its 0-based record number, its 1-based line (None if unknown), why."""

    record: int
    line: int | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"record": self.record, "line": self.line, "reason": self.reason}


@dataclass
class ImportReport:
    """What :func:`import_rollouts` read: counts, the records it skipped and why, the think format it split at."""

    source: str  # the file read, as an absolute path
    format: str
    think_format: dict[str, str]
    n_records: int = 0
    n_imported: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)
    groups: dict[str, int] = field(default_factory=dict)
    thinking: dict[str, int] = field(default_factory=dict)
    limit: int | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "format": self.format, "think_format": self.think_format,
                "n_records": self.n_records, "n_imported": self.n_imported, "n_skipped": len(self.skipped),
                "formats": self.formats, "groups": self.groups, "thinking": self.thinking, "limit": self.limit,
                "seconds": round(self.seconds, 4), "skipped": [s.to_dict() for s in self.skipped]}


@dataclass
class ImportedRollouts:
    """The imported rollouts (in file order; a record with several outputs gives several) and the report."""

    rollouts: list[Rollout]
    report: ImportReport

    def by_group(self) -> dict[str, list[Rollout]]:
        """The rollouts by group (``None`` -> ``""``), in first-seen order."""
        out: dict[str, list[Rollout]] = {}
        for r in self.rollouts:
            out.setdefault(r.group or "", []).append(r)
        return out


class _Skip(Exception):
    """A record that cannot be imported (the message is the reason)."""


# --------------------------------------------------------------------------- reading records


def read_records(path: str | os.PathLike[str]) -> tuple[list[tuple[int, int | None, Any]], list[Skipped]]:
    """The records of a JSONL file, a JSON list or a single JSON object, as ``(record, line, value)``, and the JSONL
    lines that are not valid JSON (as :class:`Skipped`). A JSON list or object that does not parse is a
    :class:`MechcliffError` (nothing of it can be read)."""
    p = Path(path)
    text = _read_text(p)
    head = text.lstrip()
    if head.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MechcliffError(f"{p}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        lines = _json_element_lines(text)
        return [(i, lines[i] if i < len(lines) else None, r) for i, r in enumerate(data)], []
    if head.splitlines()[0].strip() == "{" if head else False:  # one pretty-printed JSON object
        try:
            return [(0, _line_of_first(text), json.loads(text))], []
        except json.JSONDecodeError as e:
            raise MechcliffError(f"{p}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    records: list[tuple[int, int | None, Any]] = []
    bad: list[Skipped] = []
    n = 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            records.append((n, lineno, json.loads(raw)))
        except json.JSONDecodeError as e:
            bad.append(Skipped(n, lineno, f"invalid JSON ({e.msg}, column {e.colno})"))
        n += 1
    return records, bad


def _line_of_first(text: str) -> int:
    return text[: len(text) - len(text.lstrip())].count("\n") + 1


# --------------------------------------------------------------------------- format detection


def detect_format(rec: Any) -> str | None:
    """The format of one record (one of :data:`FORMATS` but ``auto``), or None when no format fits."""
    if not isinstance(rec, dict):
        return None
    keys = set(rec)
    if STAR1_KEYS <= keys:
        return "star1"
    if "outputs" in keys or ("text" in keys and "prompt" in keys):
        return "vllm"
    if keys & {"messages", "choices", "request"} or isinstance(rec.get("response"), dict):
        return "openai"
    if "prompt" in keys and keys & {"response", *ROLLOUT_ALIASES["response"]}:
        return "mechcliff"
    if keys & set(HF_PROMPT_KEYS) and keys & set(HF_RESPONSE_KEYS):
        return "hf"
    return None


# --------------------------------------------------------------------------- helpers


def _text(v: Any, what: str) -> str:
    """A string field; OpenAI content parts (``[{"type": "text", "text": ...}]``) are joined."""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(x, dict) for x in v):
        return "".join(str(x.get("text", "")) for x in v if x.get("type", "text") in ("text", "output_text"))
    raise _Skip(f"{what} must be a string, got {type(v).__name__}")


def _prompt(v: Any, what: str) -> str:
    s = _text(v, what)
    if not s.strip():
        raise _Skip(f"{what} is empty")
    return s


def _split(text: str, fmt: ThinkFormat, opened: bool = False) -> tuple[str | None, str, bool]:
    """``(thinking, answer, has_think_close)`` of a generation; ``opened``: the prompt already opened the thinking,
    so a text without a close tag is an unfinished thinking. A text with neither tag has no thinking (closed)."""
    thinking, answer, closed = split_thinking(text, fmt.close_tag, fmt.open_tag)
    if thinking is None:
        if opened:
            return text.strip(), "", False
        return None, text, True
    return thinking, answer, closed


def _reasoning(thinking: Any, answer: str, finish: Any, fmt: ThinkFormat) -> tuple[str | None, str, bool]:
    """A separate reasoning field: the thinking, closed unless the generation stopped (length) before any answer."""
    if thinking is None or (isinstance(thinking, str) and not thinking.strip()):
        return _split(answer, fmt)
    t = _text(thinking, "the reasoning field").strip()
    if fmt.open_tag and t.startswith(fmt.open_tag):
        t = t[len(fmt.open_tag):].strip()
    if fmt.close_tag and t.endswith(fmt.close_tag):
        t = t[: -len(fmt.close_tag)].strip()
    closed = bool(answer.strip()) or finish not in ("length", "max_tokens")
    return t, answer.lstrip(), closed


_CHATML = re.compile(r"<\|im_start\|>user\s*\n(.*?)<\|im_end\|>", re.S)
_DEEPSEEK = re.compile(r"<｜User｜>(.*?)<｜Assistant｜>", re.S)


def _untemplate(prompt: str) -> tuple[str, bool]:
    """The last user message of a prompt rendered by a ChatML or DeepSeek chat template (else the prompt), and
    whether it was templated."""
    for pat in (_CHATML, _DEEPSEEK):
        found = pat.findall(prompt)
        if found and found[-1].strip():
            return found[-1].strip(), True
    return prompt, False


def _opened(raw_prompt: str, fmt: ThinkFormat) -> bool:
    """Whether a (templated) prompt ends inside an open thinking (the R1 templates' prefilled ``<think>``)."""
    return bool(fmt.open_tag) and raw_prompt.rstrip().endswith(fmt.open_tag)


# --------------------------------------------------------------------------- per-format parsers
# each returns a list of (rollout fields, extra meta) and raises _Skip with the reason


Parsed = list[Rollout]


def _rollout(prompt: str, split: tuple[str | None, str, bool], rec: dict[str, Any], used: set[str],
             **extra: Any) -> Rollout:
    thinking, answer, closed = split
    meta = {k: v for k, v in rec.items() if k not in used and k != "id"}
    meta.update(extra)
    rid = rec.get("id")
    return Rollout(prompt=prompt, thinking=thinking, response=answer,
                   id=None if rid is None or isinstance(rid, (dict, list)) else str(rid),
                   has_think_close=closed, meta=meta)


def _parse_vllm(rec: dict[str, Any], fmt: ThinkFormat) -> Parsed:
    if "prompt" not in rec:
        raise _Skip("no 'prompt' field")
    raw = _prompt(rec["prompt"], "'prompt'")
    prompt, templated = _untemplate(raw)
    opened = _opened(raw, fmt)
    extra: dict[str, Any] = {"raw_prompt": raw} if templated else {}
    if "outputs" in rec:
        outs = rec["outputs"]
        if not isinstance(outs, list) or not outs:
            raise _Skip("'outputs' must be a non-empty list")
        rows = []
        for k, o in enumerate(outs):
            if not isinstance(o, dict) or "text" not in o:
                raise _Skip(f"outputs[{k}] has no 'text'")
            r = _rollout(prompt, _split(_text(o["text"], f"outputs[{k}].text"), fmt, opened), rec,
                         {"prompt", "outputs"}, **extra, output={kk: v for kk, v in o.items() if kk != "text"})
            if len(outs) > 1:
                r.id = f"{r.id}-{k}" if r.id is not None else None
                r.meta["output_index"] = k
            rows.append(r)
        return rows
    if "text" not in rec:
        raise _Skip("no 'outputs' or 'text' field")
    return [_rollout(prompt, _split(_text(rec["text"], "'text'"), fmt, opened), rec, {"prompt", "text"}, **extra)]


def _messages(rec: dict[str, Any]) -> Any:
    for holder in (rec, rec.get("request"), rec.get("body"), (rec.get("request") or {}).get("body")
                   if isinstance(rec.get("request"), dict) else None):
        if isinstance(holder, dict) and "messages" in holder:
            return holder["messages"]
    return None


def _choices(rec: dict[str, Any]) -> Any:
    resp = rec.get("response")
    for holder in (rec, resp, resp.get("body") if isinstance(resp, dict) else None):
        if isinstance(holder, dict) and "choices" in holder:
            return holder["choices"]
    return None


def _parse_openai(rec: dict[str, Any], fmt: ThinkFormat) -> Parsed:
    msgs = _messages(rec)
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise _Skip("no request 'messages' (a list of {role, content})")
    choices = _choices(rec)
    replies: list[tuple[dict[str, Any], Any]]
    if choices is None:
        if msgs[-1].get("role") != "assistant":
            raise _Skip("no response 'choices' and the messages do not end with the assistant's reply")
        replies, msgs = [(msgs[-1], None)], msgs[:-1]
    else:
        if not isinstance(choices, list) or not choices:
            raise _Skip("'choices' must be a non-empty list")
        replies = []
        for k, c in enumerate(choices):
            if not isinstance(c, dict) or not isinstance(c.get("message"), dict):
                raise _Skip(f"choices[{k}] has no 'message'")
            replies.append((c["message"], c.get("finish_reason")))
    users = [i for i, m in enumerate(msgs) if m.get("role") == "user"]
    if not users:
        raise _Skip("the messages have no user message")
    prompt = _prompt(msgs[users[-1]].get("content"), "the last user message")
    extra: dict[str, Any] = {}
    system = [m.get("content") for m in msgs if m.get("role") in ("system", "developer")]
    if system:
        extra["system"] = system[0] if len(system) == 1 else system
    earlier = [m for i, m in enumerate(msgs[: users[-1]]) if m.get("role") not in ("system", "developer")]
    if earlier:
        extra["messages"] = earlier
    used = {"messages", "choices", "request", "response", "body"}
    for name in ("request", "body", "response"):  # the exchange's other fields (model, usage, ...), minus the texts
        holder = rec.get(name)
        if isinstance(holder, dict):
            if isinstance(holder.get("body"), dict):
                holder = {**{k: v for k, v in holder.items() if k != "body"}, **holder["body"]}
            extra[f"{name}_meta"] = {k: v for k, v in holder.items() if k not in ("messages", "choices")}
        elif holder is not None:
            extra[name] = holder
    rows = []
    for k, (msg, finish) in enumerate(replies):
        content = msg.get("content")
        answer = "" if content is None else _text(content, f"choices[{k}].message.content")
        reasoning = next((msg[key] for key in ("reasoning_content", "reasoning") if msg.get(key) is not None), None)
        r = _rollout(prompt, _reasoning(reasoning, answer, finish, fmt), rec, used, **extra,
                     **({"finish_reason": finish} if finish is not None else {}))
        if len(replies) > 1:
            r.id = f"{r.id}-{k}" if r.id is not None else None
            r.meta["choice_index"] = k
        rows.append(r)
    return rows


def _parse_hf(rec: dict[str, Any], fmt: ThinkFormat) -> Parsed:
    pkey = next((k for k in HF_PROMPT_KEYS if k in rec), None)
    rkey = next((k for k in HF_RESPONSE_KEYS if k in rec), None)
    if pkey is None:
        raise _Skip(f"no prompt field (one of {', '.join(HF_PROMPT_KEYS)})")
    if rkey is None:
        raise _Skip(f"no generation field (one of {', '.join(HF_RESPONSE_KEYS)})")
    prompt = _prompt(rec[pkey], repr(pkey))
    used = {pkey, rkey}
    if pkey == "instruction" and isinstance(rec.get("input"), str):
        used.add("input")
        if rec["input"].strip():
            prompt = f"{prompt}\n\n{rec['input']}"
    answer = _text(rec[rkey], repr(rkey))
    tkey = next((k for k in REASONING_KEYS if k in rec and k != rkey), None)
    if tkey is not None:
        used.add(tkey)
        split = _reasoning(rec[tkey], answer, rec.get("finish_reason"), fmt)
    else:
        split = _split(answer, fmt)
    r = _rollout(prompt, split, rec, used | {"category", "group", "label"})
    _common_fields(r, rec)
    return [r]


def _parse_mechcliff(rec: dict[str, Any], fmt: ThinkFormat) -> Parsed:
    try:
        return [Rollout.from_dict(rec, think=fmt)]
    except MechcliffError as e:
        raise _Skip(str(e)) from None


def _parse_star1(rec: dict[str, Any], fmt: ThinkFormat) -> Parsed:
    for key in ("question", "response"):
        if key not in rec:
            raise _Skip(f"no {key!r} field")
    r = _rollout(_prompt(rec["question"], "'question'"), _split(_text(rec["response"], "'response'"), fmt), rec,
                 {"question", "response", "category"})
    cats = rec.get("category")
    if isinstance(cats, list):
        r.category = str(cats[0]) if cats else None
        r.meta["categories"] = cats
    elif isinstance(cats, str) and cats:
        r.category = cats
    return [r]


def _common_fields(r: Rollout, rec: dict[str, Any]) -> None:
    """A record's own ``category``, ``group`` and ``label`` (scalars) onto the rollout; others stay in meta."""
    for name in ("category", "group"):
        v = rec.get(name)
        if isinstance(v, (str, int, float)) and not isinstance(v, bool) and v != "":
            setattr(r, name, str(v))
        elif v is not None:
            r.meta[name] = v
    v = rec.get("label")
    if isinstance(v, bool) or (isinstance(v, int)):
        r.label = int(v)
    elif v is not None:
        r.meta["label"] = v


_PARSERS = {"vllm": _parse_vllm, "openai": _parse_openai, "hf": _parse_hf, "mechcliff": _parse_mechcliff,
            "star1": _parse_star1}


# --------------------------------------------------------------------------- the import


def import_rollouts(path: str | os.PathLike[str], *, format: str = "auto", group: str | None = None,
                    think: str | ThinkFormat | dict[str, str] = "default", limit: int | None = None) -> ImportedRollouts:
    """Read the rollouts of ``path`` (see the module docstring for the formats).

    Args:
        path: a JSONL file, a JSON list or one JSON object.
        format: one of :data:`FORMATS`; ``"auto"`` recognises each record by its keys (:func:`detect_format`).
        group: the group of every rollout (overrides the records' own); default: the record's ``group`` field, else
            the format's default (:data:`DEFAULT_GROUPS`: ``"harmful"`` for STAR-1), else None.
        think: the think format the generations were written in (a preset name of
            :data:`mechcliff.model.handle.THINK_PRESETS`, a ThinkFormat or a dict); ``"default"`` is
            ``<think>`` / ``</think>`` (Qwen3, QwQ, DeepSeek-R1 and its distills).
        limit: read only the first ``limit`` records.

    Returns the rollouts and an :class:`ImportReport`; records that cannot be imported are in ``report.skipped``
    (never dropped silently). Raises :class:`MechcliffError` when the file cannot be read at all, or when nothing in
    it could be imported.
    """
    t0 = time.perf_counter()
    if format not in FORMATS:
        raise MechcliffError(f"unknown rollout format {format!r}; use one of {', '.join(FORMATS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise MechcliffError(f"limit must be a positive integer, got {limit!r}")
    fmt = think_format(think)
    p = Path(path)
    records, bad = read_records(p)
    if len(records) == 1 and isinstance(records[0][2], dict) and detect_format(records[0][2]) is None:
        inner = next((records[0][2][k] for k in ("data", "rows", "records", "examples")
                      if isinstance(records[0][2].get(k), list)), None)
        if inner is not None:  # {"data": [...]}: a dataset dump
            records = [(i, None, r) for i, r in enumerate(inner)]
    if limit is not None:
        records = [r for r in records if r[0] < limit]
        bad = [b for b in bad if b.record < limit]
    report = ImportReport(source=str(p.resolve()), format=format, think_format=fmt.to_dict(), limit=limit,
                          n_records=len(records) + len(bad), skipped=list(bad))
    rollouts: list[Rollout] = []
    formats: Counter[str] = Counter()
    for index, line, rec in records:
        kind = format if format != "auto" else detect_format(rec)
        try:
            if not isinstance(rec, dict):
                raise _Skip(f"expected a JSON object, got {type(rec).__name__}")
            if kind is None:
                raise _Skip(f"no known rollout format fits its keys ({', '.join(map(str, rec)) or 'none'}); use "
                            f"--format one of {', '.join(FORMATS[1:])}")
            rows = _PARSERS[kind](rec, fmt)
        except _Skip as e:
            report.skipped.append(Skipped(index, line, str(e)))
            continue
        formats[kind] += 1
        for r in rows:
            r.group = group or r.group or DEFAULT_GROUPS.get(kind)
            r.meta["import"] = {"file": p.name, "record": index, "line": line, "format": kind}
            rollouts.append(r)
    report.skipped.sort(key=lambda s: s.record)
    report.n_imported = len(rollouts)
    report.formats = dict(formats)
    report.groups = dict(Counter(r.group or "" for r in rollouts))
    report.thinking = {"closed": sum(r.thinking is not None and r.has_think_close for r in rollouts),
                       "unclosed": sum(r.thinking is not None and not r.has_think_close for r in rollouts),
                       "none": sum(r.thinking is None for r in rollouts)}
    report.seconds = time.perf_counter() - t0
    if not rollouts:
        first = "; ".join(f"record {s.record}" + (f" (line {s.line})" if s.line else "") + f": {s.reason}"
                          for s in report.skipped[:3])
        raise MechcliffError(f"no rollouts could be imported from {p}" + (f" ({first})" if first else ""))
    return ImportedRollouts(rollouts, report)


def save_import(imported: ImportedRollouts, out: str | os.PathLike[str], *, overwrite: bool = False) -> dict[str, Path]:
    """Write the rollouts into the run folder ``out`` as ``rollouts/<group>.jsonl`` (mechcliff's format) and record
    the import in ``out/import_report.json`` (one entry per import, the latest per group; ``"rollouts"`` maps each
    group to its file: the ``rollouts`` option of the run that uses them). Returns group -> file.

    Every rollout needs a group (``import_rollouts(..., group=...)``). A group file already in the folder is
    refused unless ``overwrite``, and so is a folder whose run has finished stages (its results would no longer
    match its rollouts)."""
    from mechcliff.data import atomic_write_text, save_rollouts

    out = Path(out)
    groups = imported.by_group()
    if "" in groups:
        raise MechcliffError(f"{len(groups[''])} imported rollouts have no group; give one (--group GROUP)")
    bad = [g for g in groups if not re.fullmatch(r"[A-Za-z0-9_.-]+", g) or g.startswith(".")]
    if bad:
        raise MechcliffError(f"group names are file names: use letters, digits, '_', '-' and '.' ({', '.join(bad)})")
    if out.exists() and not out.is_dir():
        raise MechcliffError(f"--out {out} exists and is not a folder")
    files = {g: out / "rollouts" / f"{g}.jsonl" for g in groups}
    if not overwrite:
        if any((out / "stages").glob("*.done")):
            raise MechcliffError(f"{out} holds a run with finished stages; import into a new folder (or pass --overwrite "
                                 "and re-run with --overwrite)")
        there = [str(f) for f in files.values() if f.exists()]
        if there:
            raise MechcliffError(f"{', '.join(there)} already exist(s); pass --overwrite to replace, or choose another --out")
    for g, rolls in groups.items():
        save_rollouts(rolls, files[g])
    path = out / IMPORT_REPORT
    doc: dict[str, Any] = {"imports": [], "rollouts": {}}
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(old, dict) and isinstance(old.get("imports"), list):
                doc = {"imports": old["imports"], "rollouts": dict(old.get("rollouts") or {})}
        except (OSError, ValueError):
            pass
    for entry in doc["imports"]:  # an earlier import of a group written again is no longer the group's source
        if isinstance(entry, dict) and isinstance(entry.get("files"), dict):
            entry["files"] = {g: f for g, f in entry["files"].items() if g not in files}
    doc["imports"] = [e for e in doc["imports"] if not isinstance(e, dict) or e.get("files")]
    doc["imports"].append({**imported.report.to_dict(), "files": {g: str(f) for g, f in files.items()}})
    doc["rollouts"].update({g: str(f) for g, f in files.items()})
    atomic_write_text(path, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    return files
