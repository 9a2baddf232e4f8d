"""The one sampler of random control sets (mechcliff.controls) and the three controls built on it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mechcliff.asr import random_head_sets
from mechcliff.controls import layer_counts, random_control, random_controls
from mechcliff.errors import MechcliffError
from mechcliff.neurons import random_neuron_sets
from mechcliff.refusal_heads import random_heads_per_layer

pytestmark = pytest.mark.unit

HANDLE = SimpleNamespace(n_layers=4, n_heads=8)


def _sets(raw):
    return [[tuple(u) for u in s] for s in raw]


# Outputs of the three samplers before they shared mechcliff.controls (same seeds must give the same sets: they
# are saved in results and reused by cached sweep cells).
def test_random_head_sets_as_before():
    assert random_head_sets(HANDLE, 3, 3, 0) == _sets(
        [[[0, 2], [3, 0], [3, 2]], [[0, 4], [1, 0], [2, 0]], [[0, 3], [0, 5], [2, 7]]])
    assert random_head_sets(HANDLE, 5, 3, 7, exclude=[(0, 1), "L1H2", (1, 0)]) == _sets(
        [[[0, 2], [0, 5], [1, 5], [1, 7], [2, 7]], [[0, 5], [0, 7], [1, 1], [1, 6], [1, 7]],
         [[0, 5], [1, 3], [1, 6], [2, 1], [2, 6]]])


def test_random_heads_per_layer_as_before():
    assert random_heads_per_layer(HANDLE, [(0, 1), (0, 2), (1, 1)], 4, 1) == _sets(
        [[[0, 3], [0, 6], [1, 7]], [[0, 0], [0, 7], [1, 0]], [[0, 3], [0, 6], [1, 5]], [[0, 3], [0, 4], [1, 0]]])


def test_random_neuron_sets_as_before():
    neurons = [(0, 1), (0, 2), (1, 3)]
    assert random_neuron_sets(4, 64, neurons, 3, 3) == _sets(
        [[[1, 2], [1, 57], [2, 61]], [[0, 52], [1, 56], [2, 27]], [[0, 14], [2, 2], [2, 55]]])
    assert random_neuron_sets(4, 64, neurons, 3, 3, match_layers=True) == _sets(
        [[[0, 17], [0, 39], [1, 35]], [[0, 17], [0, 21], [1, 7]], [[0, 18], [0, 41], [1, 48]]])
    assert random_neuron_sets(2, 5, ["L1N0", "L1N1", "L0N4", (1, 2)], 3, 0) == _sets(
        [[[0, 0], [0, 3], [1, 3], [1, 4]], [[0, 1], [0, 2], [0, 3], [1, 4]], [[0, 0], [0, 1], [0, 2], [1, 4]]])


@pytest.mark.parametrize("method", ["sample", "reject"])
def test_sets_are_sized_sorted_seeded_and_exclusive(method):
    exclude = [(0, 0), (2, 5), (3, 7)]
    sets = random_controls(4, 8, 6, 5, 11, exclude=exclude, method=method)
    assert len(sets) == 5
    for s in sets:
        assert len(s) == len(set(s)) == 6 and s == sorted(s)
        assert not set(s) & set(exclude)
        assert all(0 <= l < 4 and 0 <= j < 8 for l, j in s)
    assert sets == random_controls(4, 8, 6, 5, 11, exclude=exclude, method=method)
    assert sets[2] == random_control(4, 8, 6, 13, exclude=exclude, method=method)  # set i: seed + i
    assert len({tuple(s) for s in sets}) > 1


@pytest.mark.parametrize("method", ["sample", "reject"])
def test_a_small_grid_gives_every_allowed_unit(method):
    (s,) = random_controls(2, 3, 10, 1, 0, exclude=[(1, 1)], method=method)
    assert s == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2)]


def test_per_layer_counts():
    ref = [(2, 1), (0, 3), (2, 4), (2, 6)]
    assert layer_counts(ref) == {0: 1, 2: 3}
    for s in random_controls(3, 8, layer_counts(ref), 4, 5, exclude=ref):
        assert layer_counts(s) == {0: 1, 2: 3} and not set(s) & set(ref)
    (full,) = random_controls(2, 3, {1: 5}, 1, 0, exclude=[(1, 0)])  # fewer left in the layer: all of them
    assert full == [(1, 1), (1, 2)]


def test_bad_method():
    with pytest.raises(MechcliffError, match="method"):
        random_controls(2, 3, 1, 1, 0, method="shuffle")
    with pytest.raises(MechcliffError, match="per-layer"):
        random_controls(2, 3, {0: 1}, 1, 0, method="reject")
