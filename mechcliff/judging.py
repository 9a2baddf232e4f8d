"""Judging files of rollouts, resumably, and agreement between two judges' verdicts.

``mechcliff judge --input ROLLOUTS.jsonl --judge NAME --out VERDICTS.jsonl`` writes one verdict per input record,
in order: ``{"index", "id", "refused", "judge", "judge_version"}``. Each line is flushed as soon as it is written,
so an interrupted run loses nothing; running the same command again keeps the verdicts already in ``--out``
(checking they came from the same judge and the same records) and judges only the rest. A half-written last
line (the process was killed mid-write) is dropped and redone.
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


def _judge_chunk(judge: Any, rollouts: Sequence[Rollout]) -> list[bool]:
    from mechcliff.asr import refusal_flags

    return refusal_flags(rollouts, judge)


def _read_verdicts(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Complete verdict lines of ``path`` and the byte length they occupy (a torn last line is excluded)."""
    data = path.read_bytes()
    verdicts: list[dict[str, Any]] = []
    good = 0
    for raw in data.splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            break
        try:
            verdicts.append(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            break
        good += len(raw)
    return verdicts, good


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
    """Judge every record of ``input_path`` (JSONL rollouts) into ``out_path``, resuming what is there."""
    from tqdm.auto import tqdm

    rollouts = load_rollouts(input_path)  # clear errors: empty file, missing fields, bad UTF-8, with file:line
    out = Path(out_path)
    name, version = getattr(judge, "name", "judge"), _judge_version(judge)
    source = content_hash([r.to_dict() for r in rollouts])
    done: list[dict[str, Any]] = []
    if out.exists():
        done, good = _read_verdicts(out)
        for i, v in enumerate(done):
            if v.get("index") != i or v.get("judge") != name or v.get("source") != source:
                raise MechcliffError(
                    f"{out} already holds verdicts from another judge or another input (line {i + 1}); "
                    "choose another --out"
                )
        if len(done) > len(rollouts):
            raise MechcliffError(f"{out} has more verdicts ({len(done)}) than {input_path} has records ({len(rollouts)})")
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
                       "judge_version": version, "source": source}
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
    if a[0].get("source") and b[0].get("source") and a[0]["source"] != b[0]["source"]:
        raise MechcliffError(f"{path_a} and {path_b} judged different input files")
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
