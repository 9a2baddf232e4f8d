"""Random control sets: the one sampler behind every "same-size random heads / neurons" control.

A control set is drawn from a grid of units ``(layer, index)``, ``0 <= layer < n_layers``, ``0 <= index < width``
(heads: ``width = n_heads``; MLP neurons: ``width = d_mlp``), never containing a unit of ``exclude``:

* ``k`` an int: ``k`` units from the whole grid (all the allowed ones when fewer remain);
* ``k`` a mapping ``{layer: count}`` (:func:`layer_counts` of a reference set): ``count`` units in each of those
  layers, layers in increasing order, all from one generator (all the allowed ones of a layer when fewer remain).

Set ``i`` of ``n_sets`` is drawn with ``random.Random(seed + i)`` and returned sorted, so a set depends only on its
own seed. How the draw uses the generator (``method``), which fixes the sets a seed gives:

* ``"sample"``: ``rng.sample`` of the allowed units listed layer by layer (the grid minus ``exclude``);
* ``"reject"``: ``rng.randrange(n_layers * width)`` over flat indices ``layer * width + index``, skipping excluded
  and already drawn units, until ``k`` are drawn: no list of the grid is built (large grids of MLP neurons).
  Only with an int ``k``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence

from mechcliff.errors import MechcliffError

Unit = tuple[int, int]
METHODS = ("sample", "reject")


def layer_counts(units: Iterable[Sequence[int]]) -> dict[int, int]:
    """``{layer: number of units of that layer}`` (duplicates counted), the ``k`` of a per-layer control."""
    counts: dict[int, int] = {}
    for l, _ in units:
        counts[int(l)] = counts.get(int(l), 0) + 1
    return counts


def _draw(rng: random.Random, n_layers: int, width: int, k: int | Mapping[int, int], excluded: set[Unit],
          method: str) -> list[Unit]:
    if isinstance(k, Mapping):
        if method != "sample":
            raise MechcliffError(f"a per-layer control is drawn with method='sample', not {method!r}")
        chosen: list[Unit] = []
        for l, c in sorted(k.items()):
            pool = [(l, j) for j in range(width) if (l, j) not in excluded]
            chosen += rng.sample(pool, min(c, len(pool)))
        return chosen
    if method == "sample":
        pool = [(l, j) for l in range(n_layers) for j in range(width) if (l, j) not in excluded]
        return rng.sample(pool, min(k, len(pool)))
    total = n_layers * width
    n_allowed = total - sum(1 for l, j in excluded if 0 <= l < n_layers and 0 <= j < width)
    want = min(k, n_allowed)
    chosen, seen = [], set()
    while len(chosen) < want:
        f = rng.randrange(total)
        u = (f // width, f % width)
        if u not in excluded and u not in seen:
            seen.add(u)
            chosen.append(u)
    return chosen


def random_controls(n_layers: int, width: int, k: int | Mapping[int, int], n_sets: int, seed: int, *,
                    exclude: Iterable[Sequence[int]] = (), method: str = "sample") -> list[list[Unit]]:
    """``n_sets`` seeded random control sets of the ``n_layers × width`` grid (see the module docstring): set ``i``
    drawn with ``random.Random(seed + i)``, sorted; none holds a unit of ``exclude``."""
    if method not in METHODS:
        raise MechcliffError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    excluded = {(int(l), int(j)) for l, j in exclude}
    return [sorted(_draw(random.Random(seed + i), int(n_layers), int(width), k, excluded, method))
            for i in range(int(n_sets))]


def random_control(n_layers: int, width: int, k: int | Mapping[int, int], seed: int, *,
                   exclude: Iterable[Sequence[int]] = (), method: str = "sample") -> list[Unit]:
    """One control set: ``random_controls(..., n_sets=1, seed)[0]``."""
    return random_controls(n_layers, width, k, 1, seed, exclude=exclude, method=method)[0]
