"""Prompt and rollout I/O: loaders for common prompt-set formats, JSONL rollouts, atomic writes.

Content warning: the built-in harmful prompts are requests for harmful content; no answers are included.

Every user-input problem (missing file, malformed JSON/CSV, a record without a prompt, ...)
raises :class:`mechcliff.errors.MechcliffError` with a message naming the file and, where
possible, the line (``FILE:LINE: ...``) or record index.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from mechcliff.errors import MechcliffError
from mechcliff.files import atomic_write_bytes, atomic_write_text

__all__ = [
    "BUILTIN_GROUPS",
    "PROMPT_KEYS",
    "Prompt",
    "Rollout",
    "atomic_write_bytes",
    "atomic_write_text",
    "builtin_prompts",
    "content_hash",
    "load_prompts",
    "load_rollouts",
    "prompt_source",
    "prompt_source_schemes",
    "register_prompt_source",
    "save_rollouts",
    "split_thinking",
]

BUILTIN_GROUPS: tuple[str, ...] = ("harmless", "harmful", "harmful_jailbreak")
"""Groups of the built-in demo prompt set, in their canonical order."""

PROMPT_KEYS: tuple[str, ...] = ("instruction", "prompt", "goal", "Goal", "forbidden_prompt")
"""Record keys / CSV columns accepted as the prompt text, in order of preference (case-insensitive)."""

CATEGORY_KEYS: tuple[str, ...] = ("category", "Category")
"""Record keys / CSV columns accepted as the category (case-insensitive)."""

_BUILTIN_RESOURCE = "mechcliff/resources/prompts.jsonl"


# --------------------------------------------------------------------------- dataclasses


@dataclass
class Prompt:
    """One prompt, with optional category (e.g. "cyber"), group (e.g. "harmful") and id."""

    text: str
    category: str | None = None
    group: str | None = None
    id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; the text is stored under ``prompt`` so the dict reloads with load_prompts."""
        return {"prompt": self.text, "category": self.category, "group": self.group, "id": self.id}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Prompt:
        """Build from a dict with a prompt key (see PROMPT_KEYS, or ``text``); raises MechcliffError."""
        if not isinstance(d, dict):
            raise MechcliffError(f"expected a JSON object for a prompt, got {type(d).__name__}")
        key = _find_key(d, PROMPT_KEYS + ("text",))
        if key is None:
            raise MechcliffError(f"no prompt key; expected one of: {', '.join(PROMPT_KEYS)}")
        return cls(
            text=_check_prompt_text(d[key], key),
            category=_opt_str(d, _find_key(d, CATEGORY_KEYS)),
            group=_opt_str(d, _find_key(d, ("group",))),
            id=_opt_str(d, _find_key(d, ("id",))),
        )


@dataclass
class Rollout:
    """One generation for a prompt, split into thinking and answer (``response``).

    ``thinking is None`` means the rollout had no thinking section; ``has_think_close`` is False
    when no close tag was generated (see :func:`split_thinking`). ``label`` is an optional
    refusal label (1 = refusal, 0 = compliance). ``meta`` holds any extra fields.
    """

    prompt: str
    thinking: str | None
    response: str
    category: str | None = None
    label: int | None = None
    group: str | None = None
    id: str | None = None
    has_think_close: bool = True
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all fields."""
        d = asdict(self)
        d["meta"] = dict(self.meta)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, think: Any = None) -> Rollout:
        """Build from a dict (as written by to_dict); unknown keys go into ``meta``. Raises MechcliffError.

        A raw generation (``response`` with think tags, no ``thinking``) is split at ``think``'s tags (a
        :class:`~mechcliff.model.handle.ThinkFormat` or a handle), else at the record's ``meta["think_tags"]``
        (``[open_tag, close_tag]``), else at ``<think>`` / ``</think>``."""
        if not isinstance(d, dict):
            raise MechcliffError(f"expected a JSON object for a rollout, got {type(d).__name__}")
        d = _rollout_aliases(d)
        for req in ("prompt", "response"):
            if req not in d:
                raise MechcliffError(f"rollout is missing the {req!r} field")
            if not isinstance(d[req], str):
                raise MechcliffError(f"rollout field {req!r} must be a string, got {type(d[req]).__name__}")
        thinking = d.get("thinking")
        if thinking is not None and not isinstance(thinking, str):
            raise MechcliffError(f"rollout field 'thinking' must be a string or null, got {type(thinking).__name__}")
        has_close = d.get("has_think_close", True)
        if not isinstance(has_close, bool):
            raise MechcliffError("rollout field 'has_think_close' must be true or false")
        response = d["response"]
        fmt = getattr(think, "think", think)
        tags = (d.get("meta") or {}).get("think_tags") if isinstance(d.get("meta"), dict) else None
        if fmt is not None:
            open_tag, close_tag = fmt.open_tag, fmt.close_tag
        elif isinstance(tags, list) and len(tags) == 2 and all(isinstance(t, str) and t for t in tags):
            open_tag, close_tag = tags
        else:
            open_tag, close_tag = "<think>", "</think>"
        if "thinking" not in d and (close_tag in response or response.lstrip().startswith(open_tag)):
            # A raw generation: split it here; an unclosed thinking is kept and marked, never mis-segmented.
            thinking, response, has_close = split_thinking(response, close_tag, open_tag)
        meta = d.get("meta", {})
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise MechcliffError("rollout field 'meta' must be a JSON object")
        known = {f.name for f in fields(cls)}
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(
            prompt=d["prompt"],
            thinking=thinking,
            response=response,
            category=_opt_str(d, "category"),
            label=_parse_label(d.get("label")),
            group=_opt_str(d, "group"),
            id=_opt_str(d, "id"),
            has_think_close=has_close,
            meta={**meta, **extra},
        )


#: Other names of a rollout's fields, accepted by :meth:`Rollout.from_dict` when the field itself is absent (in order
#: of preference): ``{prompt, thinking, answer}`` and OpenAI-style ``reasoning`` / ``reasoning_content`` records.
ROLLOUT_ALIASES: dict[str, tuple[str, ...]] = {"response": ("answer",), "thinking": ("reasoning_content", "reasoning")}


def _rollout_aliases(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with an absent field taken from its first present alias (see :data:`ROLLOUT_ALIASES`); the alias key
    is consumed (so it does not also land in ``meta``), other aliases stay as extra fields."""
    out = d
    for name, aliases in ROLLOUT_ALIASES.items():
        if name in out:
            continue
        alias = next((a for a in aliases if a in out), None)
        if alias is None:
            continue
        value = out[alias]
        if name == "response" and not isinstance(value, str):
            raise MechcliffError(f"rollout field {alias!r} must be a string, got {type(value).__name__}")
        if name == "thinking" and value is not None and not isinstance(value, str):
            raise MechcliffError(f"rollout field {alias!r} must be a string or null, got {type(value).__name__}")
        out = {**{k: v for k, v in out.items() if k != alias}, name: value}
    return out


# --------------------------------------------------------------------------- thinking split


def split_thinking(
    text: str, close_tag: str = "</think>", open_tag: str = "<think>"
) -> tuple[str | None, str, bool]:
    """Split generated text into ``(thinking, answer, has_close)`` at the FIRST ``close_tag``.

    - Close tag found: thinking is the text before it with a leading ``open_tag`` and surrounding
      whitespace stripped; the answer is the text after it with leading whitespace stripped
      (later close tags stay in the answer). ``has_close`` is True.
    - No close tag, text starts (after whitespace) with ``open_tag``: unfinished thinking,
      returns ``(text without the open tag, stripped, "", False)``.
    - No close tag and no open tag: no thinking, returns ``(None, text, False)`` (text unchanged).
    """
    if not isinstance(text, str):
        raise MechcliffError(f"split_thinking expects a string, got {type(text).__name__}")
    if not close_tag:
        raise MechcliffError("split_thinking: close_tag must be a non-empty string")
    idx = text.find(close_tag)
    if idx == -1:
        head = text.lstrip()
        if open_tag and head.startswith(open_tag):
            return head[len(open_tag):].strip(), "", False
        return None, text, False
    thinking = text[:idx].strip()
    if open_tag and thinking.startswith(open_tag):
        thinking = thinking[len(open_tag):].strip()
    return thinking, text[idx + len(close_tag):].lstrip(), True


# --------------------------------------------------------------------------- small helpers


def _find_key(d: dict[str, Any], candidates: Sequence[str]) -> str | None:
    """First key of ``d`` matching one of ``candidates`` (exact first, then case-insensitive)."""
    for c in candidates:
        if c in d:
            return c
    lower = {k.lower(): k for k in d if isinstance(k, str)}
    for c in candidates:
        if c.lower() in lower:
            return lower[c.lower()]
    return None


def _opt_str(d: dict[str, Any], key: str | None) -> str | None:
    """Optional metadata value as a string: None/"" -> None, scalars -> str, others -> error."""
    if key is None or key not in d:
        return None
    v = d[key]
    if v is None or v == "":
        return None
    if isinstance(v, (str, int, float)) and not isinstance(v, bool):
        return str(v)
    raise MechcliffError(f"field {key!r} must be a string, got {type(v).__name__}")


def _parse_label(v: Any) -> int | None:
    """A label as int (bools and integral floats accepted) or None."""
    if v is None:
        return None
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    raise MechcliffError(f"rollout field 'label' must be an integer or null, got {v!r}")


def _check_prompt_text(v: Any, key: str) -> str:
    """Validate a prompt value: a non-blank string."""
    if not isinstance(v, str):
        raise MechcliffError(f"prompt field {key!r} must be a string, got {type(v).__name__}")
    if not v.strip():
        raise MechcliffError(f"prompt field {key!r} is empty")
    return v


def _read_text(path: Path) -> str:
    """Read a UTF-8 text file (BOM tolerated), mapping OS/decoding errors to MechcliffError."""
    if not path.exists():
        raise MechcliffError(f"{path}: file not found")
    if path.is_dir():
        raise MechcliffError(f"{path}: is a directory, expected a file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise MechcliffError(f"{path}:{line}: not valid UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise MechcliffError(f"{path}: cannot read file: {e.strerror or e}") from None


def _line_of(text: str, pos: int) -> int:
    """1-based line number of character offset ``pos``."""
    return text.count("\n", 0, pos) + 1


def _json_element_lines(text: str) -> list[int]:
    """Best-effort 1-based start line of each element of a top-level JSON array."""
    dec = json.JSONDecoder()
    lines: list[int] = []
    try:
        i = text.index("[") + 1
        n = len(text)
        seen, line = 0, 1  # lines counted up to offset `seen` (incrementally: linear in the file's size)
        while True:
            while i < n and text[i] in " \t\r\n,":
                i += 1
            if i >= n or text[i] == "]":
                return lines
            line += text.count("\n", seen, i)
            seen = i
            lines.append(line)
            _, i = dec.raw_decode(text, i)
    except (ValueError, IndexError):
        return lines


def _where(path: Path | str, line: int | None) -> str:
    return f"{path}:{line}" if line is not None else f"{path}"


# --------------------------------------------------------------------------- prompt loaders


def _prompt_from_record(rec: Any, path: Path | str, index: int, line: int | None) -> Prompt:
    """Turn one JSON/JSONL record (string or object) into a Prompt, with located errors."""
    loc = f"{_where(path, line)}: record {index}"
    if isinstance(rec, str):
        if not rec.strip():
            raise MechcliffError(f"{loc}: prompt is empty")
        return Prompt(text=rec)
    if not isinstance(rec, dict):
        raise MechcliffError(f"{loc}: expected a JSON object or string, got {type(rec).__name__}")
    key = _find_key(rec, PROMPT_KEYS)
    if key is None:
        got = ", ".join(map(str, rec.keys())) or "none"
        raise MechcliffError(
            f"{loc}: no prompt key (got keys: {got}); expected one of: {', '.join(PROMPT_KEYS)}"
        )
    try:
        return Prompt.from_dict(rec)
    except MechcliffError as e:
        raise MechcliffError(f"{loc}: {e}") from None


def _parse_jsonl_records(text: str, path: Path | str) -> list[tuple[int, Any]]:
    """Parse JSONL into (line, record) pairs, skipping blank lines."""
    out: list[tuple[int, Any]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            out.append((lineno, json.loads(raw)))
        except json.JSONDecodeError as e:
            raise MechcliffError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    return out


def _prompts_from_json(text: str, path: Path) -> list[Prompt]:
    stripped = text.strip()
    if not stripped:
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and stripped.startswith("{"):
            return _prompts_from_jsonl(text, path)  # JSON Lines saved with a .json name
        raise MechcliffError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    if isinstance(data, dict):
        return [_prompt_from_record(data, path, 0, 1)]
    if not isinstance(data, list):
        raise MechcliffError(f"{path}:1: expected a JSON list of prompts, got {type(data).__name__}")
    prompts: list[Prompt] = []
    lines: list[int] | None = None
    for i, rec in enumerate(data):
        try:
            prompts.append(_prompt_from_record(rec, path, i, None))
        except MechcliffError:
            if lines is None:
                lines = _json_element_lines(text)
            line = lines[i] if i < len(lines) else None
            prompts.append(_prompt_from_record(rec, path, i, line))  # re-raises with the line
    return prompts


def _prompts_from_jsonl(text: str, path: Path) -> list[Prompt]:
    return [
        _prompt_from_record(rec, path, i, line)
        for i, (line, rec) in enumerate(_parse_jsonl_records(text, path))
    ]


def _prompts_from_csv(text: str, path: Path) -> list[Prompt]:
    reader = csv.DictReader(io.StringIO(text))
    try:
        header = reader.fieldnames
    except csv.Error as e:
        raise MechcliffError(f"{path}:1: invalid CSV header ({e})") from None
    if not header:
        return []
    hmap = {h: h for h in header if h is not None}
    pkey = _find_key(hmap, PROMPT_KEYS)
    if pkey is None:
        raise MechcliffError(
            f"{path}:1: unknown CSV header ({', '.join(map(str, header))}); expected a prompt "
            f"column named one of: {', '.join(PROMPT_KEYS)}"
        )
    ckey = _find_key(hmap, CATEGORY_KEYS)
    gkey = _find_key(hmap, ("group",))
    ikey = _find_key(hmap, ("id",))
    prompts: list[Prompt] = []
    row_index = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise MechcliffError(f"{path}:{reader.line_num}: invalid CSV ({e})") from None
        line = reader.line_num
        if all((v is None or not str(v).strip()) for v in row.values()):
            row_index += 1
            continue  # fully blank row
        value = row.get(pkey)
        if value is None or not value.strip():
            raise MechcliffError(f"{path}:{line}: row {row_index}: empty prompt in column {pkey!r}")
        prompts.append(
            Prompt(
                text=value,
                category=(row.get(ckey) or None) if ckey else None,
                group=(row.get(gkey) or None) if gkey else None,
                id=(row.get(ikey) or None) if ikey else None,
            )
        )
        row_index += 1
    return prompts


def _prompts_from_txt(text: str, path: Path) -> list[Prompt]:
    return [Prompt(text=line.strip()) for line in text.splitlines() if line.strip()]


def _sniff_format(text: str) -> str:
    """Guess the format of a file with an unknown extension."""
    head = text.lstrip()
    if head.startswith("["):
        return "json"
    if head.startswith("{"):
        return "jsonl"
    first = head.splitlines()[0] if head else ""
    try:
        cols = next(csv.reader([first]))
    except (csv.Error, StopIteration):
        cols = []
    if len(cols) > 1 and _find_key({c: c for c in cols}, PROMPT_KEYS) is not None:
        return "csv"
    return "txt"


_LOADERS = {
    "json": _prompts_from_json,
    "jsonl": _prompts_from_jsonl,
    "csv": _prompts_from_csv,
    "txt": _prompts_from_txt,
}
_EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".txt": "txt"}


def load_prompts(
    path: str | os.PathLike[str], *, group: str | None = None, limit: int | None = None
) -> list[Prompt]:
    """Load prompts from a ``.json``, ``.jsonl``, ``.csv`` or ``.txt`` file (format by extension, else sniffed).

    - ``.json``: a list of objects with a prompt key (``instruction``, ``prompt``, ``goal``,
      ``Goal``, ``forbidden_prompt``; optional ``category``/``group``/``id``) or a list of strings.
    - ``.jsonl``: one such object per line (rollout records contribute their ``prompt``).
    - ``.csv``: AdvBench (``goal``), JBB (``Goal``, ``Category``), StrongREJECT
      (``forbidden_prompt``, ``category``) or a ``prompt``/``instruction`` column.
    - ``.txt``: one prompt per line, blank lines skipped.

    ``group`` (if given) is assigned to every prompt, overriding the file's; ``limit`` keeps the
    first N prompts. Raises MechcliffError naming the file and line/record on bad input,
    including a file with no prompts.
    """
    p = Path(path)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise MechcliffError(f"limit must be a positive integer, got {limit!r}")
    text = _read_text(p)
    fmt = _EXTENSIONS.get(p.suffix.lower()) or _sniff_format(text)
    prompts = _LOADERS[fmt](text, p)
    if not prompts:
        raise MechcliffError(f"no prompts in {p}")
    if group is not None:
        for pr in prompts:
            pr.group = group
    return prompts[:limit] if limit is not None else prompts


# --------------------------------------------------------------------------- rollouts


def load_rollouts(path: str | os.PathLike[str], *, think: Any = None) -> list[Rollout]:
    """Load rollouts from JSONL (``prompt``, ``response``; optional ``thinking``, ``category``,
    ``label``, ``group``, ``id``, ``has_think_close``, ``meta``). A JSON list is also accepted.
    ``answer`` is accepted for ``response`` and ``reasoning_content`` / ``reasoning`` for ``thinking``
    (:data:`ROLLOUT_ALIASES`); other formats (vLLM, OpenAI chat completions, Hugging Face datasets, STAR-1)
    are read by :func:`mechcliff.rollout_import.import_rollouts`.
    Raw generations are split at ``think``'s tags (see :meth:`Rollout.from_dict`).
    Raises MechcliffError naming the file and line."""
    p = Path(path)
    text = _read_text(p)
    records: list[tuple[int | None, Any]]
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MechcliffError(f"{p}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(data, list):
            raise MechcliffError(f"{p}:1: expected a JSON list of rollouts")
        lines = _json_element_lines(text)
        records = [(lines[i] if i < len(lines) else None, r) for i, r in enumerate(data)]
    else:
        records = list(_parse_jsonl_records(text, p))
    out: list[Rollout] = []
    for i, (line, rec) in enumerate(records):
        try:
            out.append(Rollout.from_dict(rec, think=think))
        except MechcliffError as e:
            raise MechcliffError(f"{_where(p, line)}: record {i}: {e}") from None
    if not out:
        raise MechcliffError(f"no rollouts in {p}")
    return out


def save_rollouts(rollouts: Iterable[Rollout], path: str | os.PathLike[str]) -> None:
    """Write rollouts as JSONL, atomically (temp file in the same directory, then os.replace)."""
    lines = []
    for r in rollouts:
        if not isinstance(r, Rollout):
            raise MechcliffError(f"save_rollouts expects Rollout objects, got {type(r).__name__}")
        lines.append(json.dumps(r.to_dict(), ensure_ascii=False))
    atomic_write_text(path, "".join(line + "\n" for line in lines))


# --------------------------------------------------------------------------- built-in set


@lru_cache(maxsize=1)
def _builtin_records() -> tuple[tuple[str, str | None, str | None, str | None], ...]:
    from importlib import resources

    try:
        res = resources.files("mechcliff").joinpath("resources").joinpath("prompts.jsonl")
        text = res.read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError, TypeError, AttributeError, NotADirectoryError):
        local = Path(__file__).resolve().parent / "resources" / "prompts.jsonl"
        if not local.is_file():
            raise MechcliffError(f"built-in prompt set {_BUILTIN_RESOURCE} is missing") from None
        text = local.read_text(encoding="utf-8")
    prompts = _prompts_from_jsonl(text, Path(_BUILTIN_RESOURCE))
    return tuple((p.text, p.category, p.group, p.id) for p in prompts)


def builtin_prompts(group: str | None = None) -> list[Prompt]:
    """The built-in demo prompts (all groups, or one of BUILTIN_GROUPS), as fresh Prompt objects."""
    if group is not None and group not in BUILTIN_GROUPS:
        raise MechcliffError(
            f"unknown built-in prompt group {group!r}; available: {', '.join(BUILTIN_GROUPS)}"
        )
    return [
        Prompt(text=t, category=c, group=g, id=i)
        for t, c, g, i in _builtin_records()
        if group is None or g == group
    ]


# --------------------------------------------------------------------------- named prompt sources

PromptSets = Callable[[], Mapping[str, Sequence[Prompt]]]
"""What a registered prompt source provides: a function returning ``{NAME: prompts}``, called at each use."""

_SCHEME = re.compile(r"[a-z][a-z0-9_]*")
_PROMPT_SOURCES: dict[str, tuple[PromptSets, str]] = {}


def register_prompt_source(scheme: str, sets: PromptSets, *, what: str = "prompt set") -> None:
    """Make ``"SCHEME:NAME"`` a prompt source of :func:`prompt_source` (so a name run configs can use): ``sets()``
    returns ``{NAME: prompts}``; ``what`` names one set in error messages. Registering a scheme again replaces it.

    The module that defines the sets registers them when it is imported (:mod:`mechcliff.learned_organism`:
    ``heldout``, its held-out evaluation sets). This module never imports those (they are in higher layers): the
    experiments and commands that accept such names import the module that provides them."""
    if not isinstance(scheme, str) or not _SCHEME.fullmatch(scheme):
        raise MechcliffError(f"a prompt source scheme is a lower-case name ([a-z][a-z0-9_]*), got {scheme!r}")
    if not callable(sets):
        raise MechcliffError(f"register_prompt_source({scheme!r}): sets must be callable, got {type(sets).__name__}")
    _PROMPT_SOURCES[scheme] = (sets, what)


def prompt_source_schemes() -> tuple[str, ...]:
    """The registered prompt source schemes (``"heldout"`` once :mod:`mechcliff.learned_organism` is imported)."""
    return tuple(sorted(_PROMPT_SOURCES))


def prompt_source(src: str, group: str | None = None, limit: int | None = None) -> list[Prompt]:
    """The prompts a config or command names: ``""`` is the built-in set of ``group``; ``"SCHEME:NAME"`` the set
    NAME of a registered source (:func:`register_prompt_source`; ``"heldout:NAME"``: the learned refusal organism's
    held-out set NAME, :func:`mechcliff.learned_organism.heldout_sets`: ``harmful``, ``harmful_jailbreak``,
    ``harmless``); anything else a prompt file (:func:`load_prompts`). ``group`` (if given) is assigned to every
    prompt."""
    scheme, sep, name = src.partition(":")
    if sep and scheme in _PROMPT_SOURCES:
        sets_of, what = _PROMPT_SOURCES[scheme]
        sets = sets_of()
        if name not in sets:
            raise MechcliffError(f"unknown {what} '{name}' in {src!r}; known: {', '.join(sets)}")
        items = list(sets[name])
    elif not src:
        if group is None:
            raise MechcliffError("the built-in prompt set needs a group")
        items = builtin_prompts(group)
    else:
        if sep and _SCHEME.fullmatch(scheme) and not Path(src).exists():
            known = ", ".join(f"'{s}:'" for s in prompt_source_schemes()) or "none"
            raise MechcliffError(f"{src!r} is neither a prompt file nor a registered prompt source: no source "
                                 f"'{scheme}:' is registered (registered: {known}); the module that provides it "
                                 "registers it when imported")
        return load_prompts(src, group=group, limit=limit)
    if group is not None:
        for pr in items:
            pr.group = group
    return items[:limit] if limit is not None else items


# --------------------------------------------------------------------------- provenance


def _canonical(item: Any) -> Any:
    if isinstance(item, (Prompt, Rollout)):
        return item.to_dict()
    if is_dataclass(item) and not isinstance(item, type):
        return asdict(item)
    return item


def content_hash(items: Iterable[Any]) -> str:
    """First 16 hex chars of the sha256 of a canonical JSON of prompts/rollouts/dicts/strings."""
    payload = [_canonical(x) for x in items]
    try:
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise MechcliffError(f"content_hash: items are not JSON-serializable ({e})") from None
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
