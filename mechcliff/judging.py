"""Judging files of rollouts, resumably, and agreement between two judges' verdicts.

``mechcliff judge --input ROLLOUTS.jsonl --judge NAME --out VERDICTS.jsonl`` writes one verdict per input record,
in order: ``{"index", "id", "refused", "judge", "judge_version", "judge_config", "record"}``, where ``record`` is the
content hash of the judged record itself and ``judge_config`` a hash of the judge's ``describe()`` (e.g. custom
phrase lists). Each line is flushed as soon as it is written, so an interrupted run loses nothing.

**Resuming.** Running the same command again keeps verdict *i* of ``--out`` when it was written by the same judge
(name, version and configuration) for the same record *i* (same hash), and judges only the records after the last
kept verdict: an input that has *grown* (lines appended) gets only its new lines judged, its old verdicts untouched.
A verdict from another judge or judge version, or of a record that has changed since it was judged, is refused with
an error naming the line in both files (nothing in ``--out`` is overwritten: choose another ``--out``), as is an
input with fewer records than ``--out`` has verdicts. A half-written last line (the process was killed mid-write)
is dropped and redone; a damaged line before the end is an error (complete verdicts are never cut off).

Verdict files written before verdicts were keyed by record (a whole-input ``source`` hash instead of ``record``)
resume only on exactly the input they were written for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mechcliff.data import Rollout, content_hash, load_rollouts
from mechcliff.errors import MechcliffError


def _judge_version(judge: Any) -> str:
    d = judge.describe() if hasattr(judge, "describe") else {}
    return str(d.get("version", d.get("threshold", "")))


def judge_identity(judge: Any) -> dict[str, str]:
    """``{"name", "version", "config"}`` of a judge: what a cached verdict (or sweep cell) must share to be reused.
    ``config`` hashes the whole ``describe()``, so two custom phrase lists with the same version differ."""
    d = judge.describe() if hasattr(judge, "describe") else {}
    try:
        config = content_hash([d])
    except MechcliffError:  # describe() with values JSON cannot hold
        config = content_hash([repr(d)])
    return {"name": str(getattr(judge, "name", "judge")), "version": _judge_version(judge), "config": config}


def record_hash(rollout: Rollout) -> str:
    """The key of one judged record: the content hash of the rollout (prompt, thinking, answer, id, group, meta...)."""
    return content_hash([rollout.to_dict()])


def _judge_chunk(judge: Any, rollouts: Sequence[Rollout]) -> list[bool]:
    from mechcliff.asr import refusal_flags

    return refusal_flags(rollouts, judge)


def _read_verdicts(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Complete verdict lines of ``path`` and the byte length they occupy (a torn last line is excluded; a damaged
    line before the last is an error, so that no complete verdict after it is ever cut off)."""
    data = path.read_bytes()
    verdicts: list[dict[str, Any]] = []
    good = 0
    raws = data.splitlines(keepends=True)
    for n, raw in enumerate(raws, 1):
        try:
            if not raw.endswith(b"\n"):
                raise ValueError("no newline")
            verdicts.append(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, ValueError):
            if n < len(raws):
                raise MechcliffError(f"{path}:{n}: not a verdict line (the file is damaged); repair it or choose "
                                     "another --out") from None
            break
        good += len(raw)
    return verdicts, good


def _input_line(path: Path, index: int) -> int | None:
    """The 1-based line of record ``index`` in a JSONL input (blank lines are skipped by the loader)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if text.lstrip().startswith("["):
        from mechcliff.data import _json_element_lines

        lines = _json_element_lines(text)
    else:
        lines = [n for n, raw in enumerate(text.splitlines(), 1) if raw.strip()]
    return lines[index] if index < len(lines) else None


def _check_verdicts(done: list[dict[str, Any]], rollouts: list[Rollout], ident: dict[str, str], out: Path,
                    input_path: Path) -> None:
    """Raise a MechcliffError naming the line unless every verdict in ``done`` is this judge's on this record."""
    whole: str | None = None
    for i, v in enumerate(done):
        where = f"{out}:{i + 1}"
        if not isinstance(v, dict) or v.get("index") != i:
            raise MechcliffError(f"{where}: not verdict number {i + 1} of a mechcliff verdict file; "
                                 "choose another --out")
        if i >= len(rollouts):
            raise MechcliffError(f"{out} has more verdicts ({len(done)}) than {input_path} has records "
                                 f"({len(rollouts)}): verdicts of another input; choose another --out")
        old = (str(v.get("judge")), str(v.get("judge_version")))
        if old != (ident["name"], ident["version"]) or v.get("judge_config", ident["config"]) != ident["config"]:
            same = old == (ident["name"], ident["version"])
            raise MechcliffError(
                f"{where}: verdict of judge '{old[0]}' version {old[1]}"
                f"{' with another configuration' if same else ''}, not '{ident['name']}' version {ident['version']} "
                "(another judge); choose another --out")
        if "record" not in v:  # written before verdicts were keyed by record: a hash of the whole input
            whole = whole or content_hash([r.to_dict() for r in rollouts])
            if v.get("source") != whole:
                raise MechcliffError(
                    f"{out} was written by an older mechcliff for a whole input file (no per-record keys, line "
                    f"{i + 1}) and {input_path} is not that file any more; choose another --out")
        elif v["record"] != record_hash(rollouts[i]):
            line = _input_line(input_path, i)
            at = f"{input_path}:{line}" if line is not None else str(input_path)
            what = f"record {i + 1}" + (f", id {rollouts[i].id!r}" if rollouts[i].id is not None else "")
            raise MechcliffError(f"{at} ({what}) has changed since it was judged: {where} is the verdict of another "
                                 "record (another input); choose another --out")


@dataclass
class JudgeSummary:
    n: int
    n_refused: int
    resumed: int
    judge: str
    out: str

    @property
    def refusal_rate(self) -> float:
        return self.n_refused / self.n if self.n else float("nan")


def judge_file(input_path: str | Path, out_path: str | Path, judge: Any, *, chunk: int = 16,
               progress: bool = True) -> JudgeSummary:
    """Judge every record of ``input_path`` (JSONL rollouts) into ``out_path``, resuming what is there (see the
    module docstring: verdicts are kept per record, so an input with lines appended resumes).

    Args:
        input_path: the rollouts (JSONL, as written by :func:`mechcliff.data.save_rollouts`).
        out_path: the verdict file (JSONL, one line per record), appended to and resumed.
        judge: the judge (:func:`mechcliff.judges.get_judge`); verdicts of another judge or configuration in
            ``out_path`` are an error.
        chunk: records judged, written and synced to disk at a time.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    rollouts = load_rollouts(input_path)  # clear errors: empty file, missing fields, bad UTF-8, with file:line
    out = Path(out_path)
    ident = judge_identity(judge)
    name, version = ident["name"], ident["version"]
    done: list[dict[str, Any]] = []
    if out.exists():
        done, good = _read_verdicts(out)
        _check_verdicts(done, rollouts, ident, out, Path(input_path))
        if good < out.stat().st_size:
            with open(out, "r+b") as f:  # drop a torn last line
                f.truncate(good)
    resumed = len(done)
    n_refused = sum(bool(v["refused"]) for v in done)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        bar = tqdm(total=len(rollouts), initial=resumed, desc=f"judging ({name})", disable=not progress, leave=False)
        for start in range(resumed, len(rollouts), chunk):
            part = rollouts[start:start + chunk]
            for j, (r, refused) in enumerate(zip(part, _judge_chunk(judge, part))):
                rec = {"index": start + j, "id": r.id, "refused": bool(refused), "judge": name,
                       "judge_version": version, "judge_config": ident["config"], "record": record_hash(r)}
                f.write(json.dumps(rec) + "\n")
                n_refused += bool(refused)
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(part))
        bar.close()
    return JudgeSummary(n=len(rollouts), n_refused=n_refused, resumed=resumed, judge=name, out=str(out))


@dataclass
class Agreement:
    """Agreement of two judges' verdicts on the same records."""

    n: int
    agreement: float
    cohen_kappa: float
    both_refused: int
    both_complied: int
    only_a_refused: int
    only_b_refused: int
    judge_a: str
    judge_b: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def load_verdicts(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        raise MechcliffError(f"{p}: file not found")
    verdicts, good = _read_verdicts(p)
    if good < p.stat().st_size:
        raise MechcliffError(f"{p}:{len(verdicts) + 1}: not a complete verdict line (was the judging interrupted?)")
    for i, v in enumerate(verdicts):
        if not isinstance(v, dict) or "refused" not in v or not isinstance(v["refused"], bool):
            raise MechcliffError(f"{p}:{i + 1}: a verdict needs a boolean 'refused'")
    if not verdicts:
        raise MechcliffError(f"no verdicts in {p}")
    return verdicts


def agreement(path_a: str | Path, path_b: str | Path) -> Agreement:
    """Raw agreement and Cohen's kappa between two verdict files of the same records (matched by ``index``)."""
    a, b = load_verdicts(path_a), load_verdicts(path_b)
    if len(a) != len(b) or [v.get("index", i) for i, v in enumerate(a)] != [v.get("index", i) for i, v in enumerate(b)]:
        raise MechcliffError(f"{path_a} ({len(a)} verdicts) and {path_b} ({len(b)}) do not cover the same records")
    for i, (x, y) in enumerate(zip(a, b)):  # verdicts keyed by record (or, older files, by the whole input)
        for key in ("record", "source"):
            if x.get(key) and y.get(key) and x[key] != y[key]:
                raise MechcliffError(f"{path_a} and {path_b} judged different input files (record {i + 1} differs)")
    n = len(a)
    rr = sum(x["refused"] and y["refused"] for x, y in zip(a, b))
    cc = sum(not x["refused"] and not y["refused"] for x, y in zip(a, b))
    ra = sum(x["refused"] and not y["refused"] for x, y in zip(a, b))
    rb = sum(not x["refused"] and y["refused"] for x, y in zip(a, b))
    po = (rr + cc) / n
    pa, pb = (rr + ra) / n, (rr + rb) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    kappa = (po - pe) / (1 - pe) if pe < 1 else 1.0
    return Agreement(n=n, agreement=po, cohen_kappa=kappa, both_refused=rr, both_complied=cc, only_a_refused=ra,
                     only_b_refused=rb, judge_a=str(a[0].get("judge", path_a)), judge_b=str(b[0].get("judge", path_b)))
