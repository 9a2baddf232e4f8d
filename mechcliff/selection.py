"""Cliff-as-a-Judge: choose safety-training examples by the size of their refusal cliff (arXiv 2510.06036).

A *candidate pool* is a set of harmful-prompt rollouts of the model to be repaired, each scored by the refusal
probe: ``plateau`` (mean or max of the refusal score over the thinking), ``final`` (the score at the last
closing-template token, ``think_end``) and the misalignment score ``MS = plateau - final``. A *selection* picks
the top fraction (or top ``n``) of the pool by one of these rankings, at the same budget for every method:

* ``cliff``: largest MS first (Cliff-as-a-Judge; the paper leaves the plateau ``I`` undefined, so it is an option,
  mean over the thinking by default);
* ``final_score``: smallest final refusal score first (what the authors' code ranks by,
  ``src/train/ranking.py``);
* ``rule``: examples whose *thinking* contains refusal keywords first (the paper's rule-based baseline keeps
  exactly those; at a budget smaller than the matched set we take a seeded random subset of it, at a larger one we
  fill with seeded random non-matching examples);
* ``random``: a seeded random subset;
* ``all``: the whole pool (the budget is ignored).

Ties are broken by pool order (stable), so a selection is a pure function of pool, method, budget and seed.
Optional: ``stratify`` spreads the budget over categories in proportion to their size (largest remainders), and
``dedupe`` drops repeated prompts (same text after normalising case and spaces), keeping the better-ranked copy.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from mechcliff.data import Rollout, content_hash
from mechcliff.errors import MechcliffError
from mechcliff.results import Result

if TYPE_CHECKING:
    from mechcliff.model.handle import ModelHandle

METHODS = ("cliff", "random", "final_score", "rule", "all")

RULE_KEYWORDS: tuple[str, ...] = (
    "harmful", "harm", "dangerous", "illegal", "unethical", "unsafe", "refuse", "refusing", "refusal", "cannot",
    "can't", "shouldn't", "should not", "not appropriate", "inappropriate", "against", "policy", "safety",
    "malicious", "hurt",
)
"""Refusal keywords looked for in the *thinking* by the ``rule`` baseline (whole words, case-insensitive)."""

_RULE_RE = re.compile(r"\b(?:" + "|".join(re.escape(k) for k in RULE_KEYWORDS) + r")\b", re.IGNORECASE)


def rule_match(thinking: str | None) -> bool:
    """True when the thinking contains one of :data:`RULE_KEYWORDS` as a whole word."""
    if not thinking:
        return False
    return _RULE_RE.search(thinking.replace("\u2019", "'")) is not None


def _norm_prompt(text: str) -> str:
    return " ".join(text.lower().split())


@dataclasses.dataclass
class CandidatePool:
    """Candidate safety-training examples with their probe statistics (one entry per rollout)."""

    rollouts: list[Rollout]
    plateau_mean: np.ndarray
    plateau_max: np.ndarray
    final: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.rollouts)
        for name in ("plateau_mean", "plateau_max", "final"):
            arr = np.asarray(getattr(self, name), dtype=np.float64)
            if arr.shape != (n,):
                raise MechcliffError(f"CandidatePool.{name} has shape {arr.shape}, expected ({n},)")
            setattr(self, name, arr)

    def __len__(self) -> int:
        return len(self.rollouts)

    @property
    def ids(self) -> list[str]:
        return [r.id if r.id is not None else f"c{i}" for i, r in enumerate(self.rollouts)]

    @property
    def pool_hash(self) -> str:
        """Identity of the pool: its rollouts' prompts, thinking and answers, in order."""
        return content_hash([[r.prompt, r.thinking, r.response] for r in self.rollouts])

    def ms(self, plateau: str = "mean") -> np.ndarray:
        """MS = plateau - final per candidate (NaN where undefined, e.g. no thinking)."""
        if plateau not in ("mean", "max"):
            raise MechcliffError(f"plateau must be 'mean' or 'max', got {plateau!r}")
        return (self.plateau_mean if plateau == "mean" else self.plateau_max) - self.final

    @classmethod
    def from_trace(cls, rollouts: Sequence[Rollout], trace: Any) -> "CandidatePool":
        """Pair rollouts with the cliff statistics of a :class:`~mechcliff.trace.RefusalTrace` made from them."""
        if len(trace) != len(rollouts):
            raise MechcliffError(f"the trace has {len(trace)} examples but there are {len(rollouts)} rollouts")
        s = trace.stats
        return cls(list(rollouts), np.asarray(s["plateau_mean"]), np.asarray(s["plateau_max"]), np.asarray(s["final"]))


def score_pool(handle: ModelHandle, rollouts: Sequence[Rollout], probe: Any, *, batch_size: int = 16,
               enable_thinking: bool = True) -> CandidatePool:
    """Trace every candidate with the probe (one forward pass each) and return the scored pool."""
    from mechcliff.generation import encode_rollouts
    from mechcliff.trace import trace_refusal

    if not rollouts:
        raise MechcliffError("the candidate pool is empty")
    batch = encode_rollouts(handle, list(rollouts), enable_thinking=enable_thinking)
    trace = trace_refusal(handle, batch, probe, groups=[r.group or "" for r in rollouts],
                          ids=[r.id for r in rollouts], batch_size=batch_size)
    return CandidatePool.from_trace(rollouts, trace)


@dataclasses.dataclass
class Selection(Result):
    """Which candidates a method chose at a budget, with their ranking scores and the criteria used."""

    KIND = "selection"
    method: str
    indices: np.ndarray  # positions in the pool, in rank order
    ids: list[str]
    scores: np.ndarray  # the ranking score of each selected example (higher = chosen first)
    pool_hash: str
    pool_size: int
    criteria: dict[str, Any]
    pool_scores: np.ndarray  # the ranking score of every pool member (NaN for methods without one)
    categories: list[str | None] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return int(len(self.indices))

    @property
    def fraction(self) -> float:
        return len(self) / self.pool_size if self.pool_size else float("nan")

    def rollouts(self, pool: CandidatePool) -> list[Rollout]:
        """The selected rollouts of ``pool``; refuses a pool other than the one the selection was made from."""
        self.check_pool(pool)
        return [pool.rollouts[int(i)] for i in self.indices]

    def check_pool(self, pool: CandidatePool) -> None:
        if pool.pool_hash != self.pool_hash or len(pool) != self.pool_size:
            raise MechcliffError(
                f"this selection was made from another candidate pool ({self.pool_size} candidates, hash "
                f"{self.pool_hash}); the pool given has {len(pool)} candidates, hash {pool.pool_hash}")

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"rank": np.arange(len(self)), "index": self.indices, "id": self.ids,
                             "score": self.scores, "category": self.categories or [None] * len(self)})

    def plot(self):
        """Ranking scores of the whole pool, sorted, with the selected ones marked."""
        import plotly.graph_objects as go

        from mechcliff.plotting import OKABE_ITO, TEMPLATE

        sc = np.asarray(self.pool_scores, dtype=float)
        order = np.argsort(-np.nan_to_num(sc, nan=-np.inf), kind="stable")
        chosen = np.isin(order, self.indices)
        fig = go.Figure()
        x = np.arange(len(order))
        for mask, name, color in ((~chosen, "not selected", "#BBBBBB"), (chosen, "selected", OKABE_ITO[0])):
            fig.add_trace(go.Bar(x=x[mask], y=sc[order][mask], name=name, marker_color=color))
        fig.update_layout(template=TEMPLATE, title=f"Selection by '{self.method}': {len(self)} of {self.pool_size} "
                          f"candidates ({100 * self.fraction:.1f}%)", xaxis_title="candidate rank",
                          yaxis_title=self.criteria.get("score_name", "ranking score"), bargap=0.05)
        return fig

    def summary_rows(self) -> list[tuple[str, str]]:
        return [("method", self.method), ("selected", f"{len(self)} of {self.pool_size}"),
                ("criteria", ", ".join(f"{k}={v}" for k, v in self.criteria.items()))]


def budget_size(pool_size: int, *, fraction: float | None = None, n: int | None = None) -> int:
    """The number of examples a budget buys; a budget of 0 or above the pool is an error."""
    if (fraction is None) == (n is None):
        raise MechcliffError("give exactly one budget: a fraction of the pool or a number of examples n")
    if pool_size <= 0:
        raise MechcliffError("the candidate pool is empty")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise MechcliffError(f"budget n must be a positive integer, got {n!r}")
        if n > pool_size:
            raise MechcliffError(f"budget n={n} is larger than the candidate pool ({pool_size})")
        return int(n)
    f = float(fraction)  # type: ignore[arg-type]
    if not math.isfinite(f) or f <= 0 or f > 1:
        raise MechcliffError(f"budget fraction must be in (0, 1], got {fraction!r}")
    return max(1, min(pool_size, int(math.ceil(f * pool_size - 1e-9))))


def _ranking(pool: CandidatePool, method: str, plateau: str, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Pool scores (higher = chosen first) and the name of the score, for ``method``."""
    n = len(pool)
    rng = np.random.default_rng(seed)
    if method == "cliff":
        return pool.ms(plateau), np.zeros(n), f"MS = plateau_{plateau} − final"
    if method == "final_score":
        return -pool.final, np.zeros(n), "− final refusal score"
    if method == "rule":
        return np.array([float(rule_match(r.thinking)) for r in pool.rollouts]), rng.random(n), "thinking has refusal keywords"
    if method in ("random", "all"):
        return np.full(n, np.nan), rng.random(n), "none (random order)"
    raise MechcliffError(f"unknown selection method {method!r}; methods: {', '.join(METHODS)}")


def select(pool: CandidatePool, method: str = "cliff", *, fraction: float | None = None, n: int | None = None,
           plateau: str = "mean", stratify: bool = False, dedupe: bool = False, seed: int = 0) -> Selection:
    """Select candidates from ``pool`` by ``method`` (see module docstring) at a budget of ``fraction`` or ``n``."""
    if method not in METHODS:
        raise MechcliffError(f"unknown selection method {method!r}; methods: {', '.join(METHODS)}")
    if len(pool) == 0:
        raise MechcliffError("the candidate pool is empty")
    scores, tiebreak, score_name = _ranking(pool, method, plateau, seed)
    key = np.nan_to_num(scores, nan=-np.inf)
    # Rank: score descending, then the method's tie-break (random for rule/random), then pool order.
    order = np.lexsort((np.arange(len(pool)), tiebreak, -key))
    if dedupe:
        seen: set[str] = set()
        keep = []
        for i in order:
            t = _norm_prompt(pool.rollouts[i].prompt)
            if t not in seen:
                seen.add(t)
                keep.append(i)
        order = np.asarray(keep, dtype=np.int64)
    available = len(order)
    k = available if method == "all" else (budget_size(available, fraction=fraction, n=n))
    cats = [pool.rollouts[i].category for i in range(len(pool))]
    if stratify and method != "all":
        picked: list[int] | np.ndarray = _stratified(order, cats, k)
    else:
        picked = order[:k]
    chosen = np.asarray(picked, dtype=np.int64)
    ids = pool.ids
    criteria = {"fraction": fraction, "n": n, "budget": int(k), "plateau": plateau, "stratify": stratify,
                "dedupe": dedupe, "seed": seed, "score_name": score_name, "pool_after_dedupe": int(available)}
    return Selection(method=method, indices=chosen, ids=[ids[i] for i in chosen],
                     scores=np.asarray(scores[chosen], dtype=np.float64), pool_hash=pool.pool_hash, pool_size=len(pool),
                     criteria=criteria, pool_scores=np.asarray(scores, dtype=np.float64),
                     categories=[cats[i] for i in chosen])


def select_by_cliff(pool: CandidatePool, *, fraction: float | None = None, n: int | None = None, plateau: str = "mean",
                    stratify: bool = False, dedupe: bool = False) -> Selection:
    """Cliff-as-a-Judge: the candidates with the largest MS = plateau − final (see :func:`select`)."""
    return select(pool, "cliff", fraction=fraction, n=n, plateau=plateau, stratify=stratify, dedupe=dedupe)


def _stratified(order: np.ndarray, cats: list[str | None], k: int) -> list[int]:
    """Top-ranked members of each category, with the budget split in proportion to category size."""
    by_cat: dict[str | None, list[int]] = {}
    for i in order:
        by_cat.setdefault(cats[i], []).append(int(i))
    total = len(order)
    quota = {c: k * len(m) / total for c, m in by_cat.items()}
    alloc = {c: int(math.floor(q)) for c, q in quota.items()}
    # Largest remainders get the leftover slots (ties: the category whose best member ranks higher).
    rank_of = {int(i): r for r, i in enumerate(order)}
    rest = sorted(by_cat, key=lambda c: (-(quota[c] - alloc[c]), rank_of[by_cat[c][0]]))
    for c in rest[: k - sum(alloc.values())]:
        alloc[c] += 1
    picked = [i for c, m in by_cat.items() for i in m[: alloc[c]]]
    return sorted(picked, key=lambda i: rank_of[i])
