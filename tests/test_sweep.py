"""Ablation sweeps with random controls, capability checks and resumption."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mechcliff.errors import MechcliffError
from mechcliff.sweep import AblationSweepResult, ablation_sweep, continuation_loss


@pytest.fixture(scope="module")
def groups(builtin):
    attack = [p for p in builtin if p.group == "harmful_jailbreak"][:10]
    harmless = [p for p in builtin if p.group == "harmless"][:10]
    return attack, harmless


def test_sweep_on_the_organism(organism, groups, refusal_judge, tmp_path):
    attack, harmless = groups
    ranked = ["L1H3", "L1H6", "L2H1", "L0H0"]
    res = ablation_sweep(organism, ranked, attack, harmless, judge=refusal_judge, ks=(1, 2, 3), gammas=(0.0, 1.0),
                         n_random=2, out_dir=tmp_path, progress=False)
    assert res.baseline["asr"] == 1.0 and res.baseline["harmless_refusal"] == 0.0
    ks, ranked_asr, _, _ = res.curve("scale_z", 0.0, "ranked")
    assert ks == [1, 2, 3] and ranked_asr == [1.0, 1.0, 0.0]  # the circuit is redundant: all three are needed
    _, random_asr, _, _ = res.curve("scale_z", 0.0, "random")
    assert min(random_asr) >= 0.6
    for c in res.cells:
        assert np.isfinite(c["loss"]) and c["kl"] >= -1e-12 and c["harmless_refusal"] <= 0.1
        if c["gamma"] == 1.0:  # γ=1 is a no-op: same ASR, same loss, zero KL
            assert c["asr"] == res.baseline["asr"] and c["kl"] == pytest.approx(0.0, abs=1e-12)
            assert c["loss"] == pytest.approx(res.baseline["loss"], abs=1e-9)
    fig = res.plot()
    assert len(fig.data) == 4  # ranked + random lines for each γ
    back = AblationSweepResult.load(res.save(tmp_path / "saved"))
    assert back.cells == res.cells


def test_sweep_resumes_without_recomputing(organism, groups, refusal_judge, tmp_path, monkeypatch):
    attack, harmless = groups
    kw = dict(judge=refusal_judge, ks=(1, 2), n_random=1, out_dir=tmp_path, progress=False)
    first = ablation_sweep(organism, ["L1H3", "L1H6"], attack, harmless, **kw)
    lines = (tmp_path / "cells.jsonl").read_text().splitlines()
    (tmp_path / "cells.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:7])  # interrupted mid-line
    import mechcliff.sweep as sweep_mod

    calls = []
    real = sweep_mod.intervene

    def counting(*a, **k):
        calls.append(a[1])
        return real(*a, **k)

    monkeypatch.setattr(sweep_mod, "intervene", counting)
    second = ablation_sweep(organism, ["L1H3", "L1H6"], attack, harmless, **kw)
    assert len(calls) == len(first.cells) - 2  # only the cells not yet on disk
    assert [c["asr"] for c in second.cells] == [c["asr"] for c in first.cells]
    assert len((tmp_path / "cells.jsonl").read_text().splitlines()) == len(first.cells)


def test_capability_loss_rises_when_the_model_is_broken(organism, organism_rollouts):
    from mechcliff.generation import encode_rollouts
    from mechcliff.interventions import intervene

    batch = encode_rollouts(organism, [r for r in organism_rollouts if r.group == "harmless"][:8])
    base = continuation_loss(organism, batch)
    with intervene(organism, [(3, h) for h in range(8)], gamma=30.0):  # amplified junk drowns the bigram signal
        broken = continuation_loss(organism, batch)
    assert broken > base


def test_bad_sweep_inputs(organism, groups, refusal_judge):
    attack, harmless = groups
    with pytest.raises(MechcliffError, match="between 1 and"):
        ablation_sweep(organism, ["L1H3"], attack, harmless, judge=refusal_judge, ks=(2,), progress=False)
    with pytest.raises(MechcliffError, match="empty"):
        ablation_sweep(organism, [], attack, harmless, judge=refusal_judge, progress=False)
