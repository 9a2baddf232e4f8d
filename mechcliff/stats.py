"""Small statistics helpers: Wilson score intervals and refusal rates by category."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from mechcliff.errors import MechcliffError

__all__ = ["Rate", "rate_by_category", "wilson_interval"]


def _check_count(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise MechcliffError(f"{name} must be an integer, got {v!r}")
    return v


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` trials; ``n == 0`` gives (0.0, 1.0)."""
    k, n = _check_count("k", k), _check_count("n", n)
    if n < 0 or k < 0 or k > n:
        raise MechcliffError(f"need 0 <= k <= n, got k={k}, n={n}")
    if not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise MechcliffError(f"confidence must be in (0, 1), got {confidence!r}")
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)
    p = k / n
    z2n = z * z / n
    denom = 1.0 + z2n
    center = (p + z2n / 2.0) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, center - half)
    high = 1.0 if k == n else min(1.0, center + half)
    return low, high


@dataclass
class Rate:
    """A proportion ``k/n`` with its Wilson interval; ``rate`` is NaN when ``n == 0``."""

    k: int
    n: int
    rate: float
    low: float
    high: float

    @classmethod
    def of(cls, k: int, n: int, confidence: float = 0.95) -> Rate:
        """Rate of k out of n with a Wilson interval at ``confidence``."""
        low, high = wilson_interval(k, n, confidence)
        return cls(k=k, n=n, rate=k / n if n else math.nan, low=low, high=high)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (a NaN rate becomes None)."""
        return {
            "k": self.k,
            "n": self.n,
            "rate": None if math.isnan(self.rate) else self.rate,
            "low": self.low,
            "high": self.high,
        }


def rate_by_category(
    flags: Sequence[bool], categories: Sequence[str | None], confidence: float = 0.95
) -> dict[str, Rate]:
    """Rate of True flags per category (None -> "uncategorized"), keys sorted by name."""
    if len(flags) != len(categories):
        raise MechcliffError(f"got {len(flags)} flags but {len(categories)} categories")
    counts: dict[str, list[int]] = {}
    for f, c in zip(flags, categories):
        key = "uncategorized" if c is None else str(c)
        kn = counts.setdefault(key, [0, 0])
        kn[0] += 1 if f else 0
        kn[1] += 1
    return {c: Rate.of(k, n, confidence) for c, (k, n) in sorted(counts.items())}
