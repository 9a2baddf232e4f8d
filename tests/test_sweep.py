"""Ablation sweeps with random controls, capability checks and resumption."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mechcliff.errors import MechcliffError
from mechcliff.sweep import AblationSweepResult, ablation_sweep, continuation_loss

pytestmark = pytest.mark.organism


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


def test_cached_cells_of_another_experiment_are_kept_but_not_reused(organism, groups, builtin, organism_rollouts,
                                                                     refusal_judge, tmp_path, monkeypatch):
    """Issue 16: a cell is reused only when the whole experiment that produced it is the same."""
    import mechcliff.sweep as sweep_mod
    from mechcliff.judges import RefusalPhraseJudge

    attack, harmless = groups[0][:3], groups[1][:2]
    harmless_rollouts = [r for r, p in zip(organism_rollouts, builtin) if p.group == "harmless"][:2]
    assert [r.prompt for r in harmless_rollouts] == [p.text for p in harmless]
    cells_file = tmp_path / "cells.jsonl"
    # A cell of the old format (keyed by mode, γ, k, selection, seed only), from another experiment.
    legacy = {"mode": "scale_z", "gamma": 0.0, "k": 1, "selection": "ranked", "seed": 0, "heads": ["L1H3"],
              "asr": 0.0, "asr_low": 0.0, "asr_high": 0.5, "harmless_refusal": 0.0, "loss": 1.0, "kl": 0.0}
    cells_file.write_text(json.dumps(legacy) + "\n")
    calls = []
    real = sweep_mod.intervene

    def counting(*a, **k):
        calls.append([tuple(h) for h in a[1]])
        return real(*a, **k)

    monkeypatch.setattr(sweep_mod, "intervene", counting)

    def run(heads=("L1H3", "L1H6", "L2H1"), att=attack, judge=refusal_judge, generation=None, seed=0, ks=(1, 3)):
        calls.clear()
        return ablation_sweep(organism, list(heads), att, harmless, judge=judge, ks=ks, n_random=0, seed=seed,
                              out_dir=tmp_path, generation=generation, harmless_rollouts=harmless_rollouts,
                              progress=False)

    with pytest.warns(UserWarning, match=r"1 cached cell\(s\) come from another experiment .*not reused"):
        first = run()
    assert len(calls) == 2, "the legacy cell was reused"
    assert [c["heads"] for c in first.cells] == [["L1H3"], ["L1H3", "L1H6", "L2H1"]]
    assert first.cells[1]["asr"] == 0.0  # the planted circuit, ablated
    # The case: other ranked heads in the same folder -> the old cells must not come back.
    with pytest.warns(UserWarning, match="1 cached cell"):  # only the legacy line: these are other cells
        other = run(heads=("L3H7", "L0H0", "L2H2"))
    assert len(calls) == 2
    assert [c["heads"] for c in other.cells] == [["L3H7"], ["L3H7", "L0H0", "L2H2"]]
    assert other.cells[1]["asr"] == 1.0  # not the planted circuit: the jailbreaks still succeed
    other_prompts = [p for p in builtin if p.group == "harmful_jailbreak"][3:6]
    custom_judge = RefusalPhraseJudge(phrases=("sorry",))  # same name, another version ("v1+custom")
    for what, kw in (("prompts", dict(att=other_prompts)), ("judge version", dict(judge=custom_judge)),
                     ("generation", dict(generation={"max_answer_tokens": 8})), ("seed", dict(seed=1))):
        with pytest.warns(UserWarning) as warned:
            run(ks=(1,), **kw)
        assert len(calls) == 1, f"a cell was reused although the {what} differ"
        assert any(what.split()[0] in str(w.message) for w in warned)  # the warning names what differs
    with monkeypatch.context() as m:  # other weights, or the same base with an adapter
        m.setattr(organism, "model_hash", "0000000000000000")
        run(ks=(1,))
        assert len(calls) == 1, "a cell was reused although the model weights differ"
        m.setitem(organism.extra, "adapter", str(tmp_path / "adapter"))
        run(ks=(1,))
        assert len(calls) == 1, "a cell was reused although the adapter differs"
    # Nothing was deleted: every cell ever computed (and the legacy one) is still in the file...
    lines = [json.loads(x) for x in cells_file.read_text().splitlines()]
    assert len(lines) == 1 + 2 * 2 + 6 and lines[0] == legacy
    # ...and the first experiment, run again, gets exactly its own cells back without recomputing.
    again = run()
    assert calls == [] and again.cells == first.cells
    # Explicit defaults are the same generation settings as implicit ones.
    run(generation={"max_think_tokens": 64, "progress": True})
    assert calls == []


def test_zero_mode_makes_one_cell_per_k_whatever_the_gammas_and_mean_is_refused_at_once(organism, builtin):
    """zero takes no gamma: a grid over gammas gives it one cell per k (not one per gamma, each mislabelled)."""
    from mechcliff.errors import MechcliffError
    from mechcliff.judges import get_judge
    from mechcliff.sweep import ablation_sweep

    attack = [p for p in builtin if p.group == "harmful_jailbreak"][:2]
    harmless = [p for p in builtin if p.group == "harmless"][:2]
    res = ablation_sweep(organism, ["L1H3", "L1H6"], attack, harmless, judge=get_judge("refusal"), ks=(1,),
                         gammas=(0.0, 0.5), modes=("zero", "scale_z"), n_random=0, progress=False)
    assert sorted((c["mode"], c["gamma"]) for c in res.cells) == [("scale_z", 0.0), ("scale_z", 0.5), ("zero", 0.0)]
    with pytest.raises(MechcliffError, match="does not run mode 'mean'"):
        ablation_sweep(organism, ["L1H3"], attack, harmless, judge=get_judge("refusal"), ks=(1,), modes=("mean",),
                       progress=False)


def test_continuation_loss_equals_the_full_log_softmax_reference(organism, organism_batch):
    """Only the target tokens' log-probs are formed, a few positions at a time: the same loss as the float64
    log-softmax of the whole [batch, pos, vocab] logits."""
    import torch

    from mechcliff.model.capture import forward

    batch = organism_batch[:20]
    total, count = 0.0, 0
    with torch.no_grad():
        logits = forward(organism, batch.tokens, batch.attention_mask)
    lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch.tokens[:, 1:, None])[..., 0]
    keep = torch.zeros_like(batch.tokens, dtype=torch.bool)
    for j in range(len(batch)):
        keep[j, batch.spans[j]["prefix"][1]:] = True
    keep = keep[:, 1:] & batch.attention_mask[:, 1:].bool()
    total, count = -float(lp[keep].sum()), int(keep.sum())
    want = total / count
    for kw in ({}, {"batch_size": 3, "positions_per_step": 2}, {"max_tokens": 50}):
        # other chunks change float32 rounding of the logits only (exactly nothing on the organism)
        assert abs(continuation_loss(organism, batch, **kw) - want) <= 1e-6 * abs(want) + 1e-12
