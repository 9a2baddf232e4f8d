"""Per-head scores, written once: head labels, the mean over examples, the ranking and the top heads.

Every per-head result of mechcliff (direct probe attribution, head patching, Ships importance) holds
``per_example: [example, layer, head]`` and ranks heads by one ``[layer, head]`` score map. :class:`PerHeadScores`
gives them ``mean``, ``ranked_heads`` and ``top``; a result chooses its score map with :meth:`head_scores`.
Heads whose score is not finite (NaN: not computed, or after the probe layer) are never ranked.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jaxtyping import Float

Head = tuple[int, int]


def head_label(head: Sequence[int]) -> str:
    """``(2, 3)`` → ``"L2H3"``."""
    return f"L{int(head[0])}H{int(head[1])}"


def rank_heads(scores: Float[np.ndarray, "layer head"], *, descending: bool = True) -> list[Head]:
    """Heads ``(layer, head)`` with finite scores, by score (ties keep layer-major order)."""
    flat = [(float(scores[l, h]), (l, h)) for l in range(scores.shape[0]) for h in range(scores.shape[1])
            if np.isfinite(scores[l, h])]
    flat.sort(key=lambda t: t[0], reverse=descending)
    return [hd for _, hd in flat]


class PerHeadScores:
    """Mixin for a result with ``per_example: [example, layer, head]``."""

    per_example: np.ndarray

    @property
    def mean(self) -> Float[np.ndarray, "layer head"]:
        """Mean over examples, ``[layer, head]``."""
        return self.per_example.mean(0)

    def head_scores(self) -> Float[np.ndarray, "layer head"]:
        """The map heads are ranked by (largest first); default the mean."""
        return self.mean

    def ranked_heads(self) -> list[Head]:
        """Heads by :meth:`head_scores`, largest first (non-finite scores left out)."""
        return rank_heads(self.head_scores())

    def top(self, k: int) -> list[str]:
        """Labels (``"L2H3"``) of the ``k`` highest-ranked heads."""
        return [head_label(h) for h in self.ranked_heads()[:k]]
