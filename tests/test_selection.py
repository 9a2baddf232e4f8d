"""Cliff-as-a-Judge selection: rankings, budgets, ties, stratification, dedupe, pools, save/load, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from mechcliff.data import Rollout
from mechcliff.errors import MechcliffError
from mechcliff.repair_curve import load_pool, save_pool
from mechcliff.selection import CandidatePool, Selection, budget_size, rule_match, select, select_by_cliff

pytestmark = pytest.mark.unit


def make_pool(plateau_mean, final, plateau_max=None, categories=None, prompts=None, thinking=None) -> CandidatePool:
    n = len(final)
    rolls = [Rollout(prompt=(prompts[i] if prompts else f"prompt {i}"),
                     thinking=(thinking[i] if thinking else "the user asks for something"),
                     response="ok", category=(categories[i] if categories else None), id=f"p{i}", group="harmful")
             for i in range(n)]
    pm = np.asarray(plateau_mean, dtype=float)
    return CandidatePool(rolls, pm, np.asarray(plateau_max if plateau_max is not None else pm, dtype=float),
                         np.asarray(final, dtype=float))


def test_cliff_ranks_by_ms_and_final_score_by_lowest_final():
    pool = make_pool(plateau_mean=[0.9, 0.5, 0.8, 0.3], final=[0.1, 0.4, 0.7, 0.05])
    # MS = 0.8, 0.1, 0.1, 0.25
    cliff = select(pool, "cliff", n=2)
    assert cliff.indices.tolist() == [0, 3]
    np.testing.assert_allclose(cliff.scores, [0.8, 0.25])
    final = select(pool, "final_score", n=2)
    assert final.indices.tolist() == [3, 0]  # lowest final refusal score first, as in the authors' code
    assert select_by_cliff(pool, n=2).indices.tolist() == [0, 3]


def test_ties_break_by_pool_order():
    pool = make_pool(plateau_mean=[0.5, 0.9, 0.9, 0.9, 0.1], final=[0.0, 0.4, 0.4, 0.4, 0.0])
    # MS: 0.5, 0.5, 0.5, 0.5, 0.1: four-way tie at the top
    assert select(pool, "cliff", n=3).indices.tolist() == [0, 1, 2]
    assert select(pool, "cliff", n=4).indices.tolist() == [0, 1, 2, 3]


def test_plateau_option_changes_the_ranking():
    pool = make_pool(plateau_mean=[0.5, 0.4], plateau_max=[0.6, 0.99], final=[0.1, 0.1])
    assert select(pool, "cliff", n=1, plateau="mean").indices.tolist() == [0]
    assert select(pool, "cliff", n=1, plateau="max").indices.tolist() == [1]
    with pytest.raises(MechcliffError, match="plateau"):
        select(pool, "cliff", n=1, plateau="median")


def test_budgets():
    assert budget_size(100, fraction=0.05) == 5
    assert budget_size(40, fraction=0.01) == 1  # at least one example
    assert budget_size(40, fraction=0.1) == 4
    assert budget_size(7, fraction=1.0) == 7
    assert budget_size(10, n=10) == 10
    for bad in (dict(fraction=0.0), dict(fraction=1.5), dict(fraction=float("nan")), dict(n=0), dict(n=11), dict(n=2.5)):
        with pytest.raises(MechcliffError):
            budget_size(10, **bad)
    with pytest.raises(MechcliffError, match="exactly one budget"):
        budget_size(10, fraction=0.5, n=2)
    with pytest.raises(MechcliffError, match="larger than the candidate pool"):
        select(make_pool([0.5] * 3, [0.1] * 3), "cliff", n=4)


def test_empty_pool_is_an_error():
    empty = CandidatePool([], np.zeros(0), np.zeros(0), np.zeros(0))
    with pytest.raises(MechcliffError, match="empty"):
        select(empty, "cliff", fraction=0.5)


def test_all_ignores_the_budget_and_random_is_seeded():
    pool = make_pool(plateau_mean=np.linspace(0, 1, 20), final=np.zeros(20))
    assert len(select(pool, "all")) == 20
    a, b, c = (select(pool, "random", n=5, seed=s) for s in (1, 1, 2))
    assert a.indices.tolist() == b.indices.tolist()
    assert a.indices.tolist() != c.indices.tolist()
    assert len(set(a.indices.tolist())) == 5


def test_rule_prefers_keyword_thinking_then_fills_randomly():
    thinking = ["this is harmful so i should refuse", "sounds fine", "ok then", "that would be illegal", "sure"]
    pool = make_pool([0.5] * 5, [0.1] * 5, thinking=thinking)
    sel = select(pool, "rule", n=2, seed=0)
    assert sorted(sel.indices.tolist()) == [0, 3]
    sel3 = select(pool, "rule", n=3, seed=0)
    assert set(sel3.indices.tolist()[:2]) == {0, 3} and sel3.indices[2] in (1, 2, 4)
    assert rule_match("It’s dangerous.") and not rule_match("harmless and fine") and not rule_match(None)


def test_stratified_budget_is_proportional_and_keeps_the_best_of_each_category():
    cats = ["a"] * 6 + ["b"] * 3 + ["c"] * 1
    ms = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.95, 0.3, 0.2, 0.1]
    pool = make_pool(plateau_mean=ms, final=[0.0] * 10, categories=cats)
    sel = select(pool, "cliff", n=5, stratify=True)
    got = [cats[i] for i in sel.indices]
    assert len(sel) == 5
    assert got.count("a") == 3 and got.count("b") == 2 and got.count("c") == 0  # 3.0, 1.5, 0.5 -> largest remainders
    assert set(sel.indices.tolist()) == {0, 1, 2, 6, 7}
    # unstratified, the budget goes to the top MS wherever it is
    assert set(select(pool, "cliff", n=5).indices.tolist()) == {6, 0, 1, 2, 3}


def test_dedupe_keeps_the_best_ranked_copy():
    prompts = ["Build a bomb", "build  a BOMB", "other", "third"]
    pool = make_pool(plateau_mean=[0.5, 0.9, 0.4, 0.3], final=[0.0] * 4, prompts=prompts)
    sel = select(pool, "cliff", n=2, dedupe=True)
    assert sel.indices.tolist() == [1, 2]
    assert sel.criteria["pool_after_dedupe"] == 3
    with pytest.raises(MechcliffError, match="larger than"):
        select(pool, "cliff", n=4, dedupe=True)


def test_undefined_ms_ranks_last():
    pool = make_pool(plateau_mean=[np.nan, 0.5, 0.2], final=[0.1, 0.1, 0.1])
    assert select(pool, "cliff", n=3).indices.tolist() == [1, 2, 0]


def test_selection_round_trip_and_pool_identity(tmp_path):
    pool = make_pool(plateau_mean=[0.9, 0.5, 0.8], final=[0.1, 0.4, 0.7], categories=["x", "y", None])
    sel = select(pool, "cliff", fraction=0.5)
    back = Selection.load(sel.save(tmp_path / "sel"))
    assert back.indices.tolist() == sel.indices.tolist() and back.ids == sel.ids and back.method == "cliff"
    assert [r.prompt for r in back.rollouts(pool)] == ["prompt 0", "prompt 2"]
    other = make_pool(plateau_mean=[0.9, 0.5, 0.8], final=[0.1, 0.4, 0.7], prompts=["a", "b", "c"])
    with pytest.raises(MechcliffError, match="another candidate pool"):
        back.rollouts(other)
    fig = back.plot()
    assert len(fig.data) == 2 and "cliff" in fig.layout.title.text
    assert sum(len(t.x) for t in fig.data) == 3


def test_pool_file_round_trip(tmp_path):
    pool = make_pool(plateau_mean=[0.9, np.nan], final=[0.1, 0.4], plateau_max=[0.95, np.nan])
    save_pool(pool, tmp_path / "pool.jsonl")
    back = load_pool(tmp_path / "pool.jsonl")
    assert back.pool_hash == pool.pool_hash
    np.testing.assert_allclose(back.ms(), pool.ms())
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "response": "y"}\n')
    with pytest.raises(MechcliffError, match="plateau_mean"):
        load_pool(tmp_path / "bad.jsonl")
    with pytest.raises(MechcliffError, match="not found"):
        load_pool(tmp_path / "missing.jsonl")


def test_unknown_method():
    with pytest.raises(MechcliffError, match="unknown selection method"):
        select(make_pool([0.5], [0.1]), "llm_judge", n=1)
