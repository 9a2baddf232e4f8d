"""Sampling as in the papers (issue 15 item 4): temperature / top-p, n samples per prompt with a seed per sample
that does not depend on batching, and ASR over all samples with per-prompt Wilson intervals.

The ground truth of the sampler is statistical: :class:`~mechcliff.generation.SeededSampler` alone, on a fixed
logit vector, draws tokens with the frequencies of ``softmax(logits / T)`` (and of its top-p truncation,
renormalised), within a few standard errors over 20,000 draws."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from mechcliff.asr import asr_of
from mechcliff.data import Rollout
from mechcliff.errors import MechcliffError
from mechcliff.generation import Sampling, SeededSampler, generate_rollouts, top_p_mask
from mechcliff.stats import Rate

LOGITS = [2.0, 1.0, 0.5, 0.0, -1.0, -3.0]


def _expected(logits: list[float], temperature: float, top_p: float = 1.0) -> np.ndarray:
    """softmax(logits / T), truncated to the smallest set of most likely tokens whose mass reaches top_p, renormalised
    (computed in numpy, independently of the code under test)."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros(len(p), dtype=bool)
    mass = 0.0
    for i in order:
        keep[i] = True
        mass += p[i]
        if mass >= top_p:
            break
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def _draw(temperature: float, top_p: float, n_rows: int = 4000, steps: int = 5) -> np.ndarray:
    """Token counts of n_rows x steps draws: each row its own generator (as in generation), several calls (steps)."""
    s = Sampling(temperature=temperature, top_p=top_p, n=2, seed=11)
    sampler = SeededSampler([s.generator(i, 0, 0) for i in range(n_rows)], temperature, top_p)
    scores = torch.tensor([LOGITS] * n_rows)
    counts = np.zeros(len(LOGITS))
    for _ in range(steps):
        out = sampler(torch.zeros(n_rows, 1, dtype=torch.long), scores)
        assert (torch.isfinite(out).sum(-1) == 1).all()  # one finite score per row: greedy decoding takes it
        counts += np.bincount(out.argmax(-1).numpy(), minlength=len(LOGITS))
    return counts


@pytest.mark.unit
@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (1.0, 1.0), (1.5, 1.0), (0.7, 0.8), (1.0, 0.9), (1.5, 0.7)])
def test_sampler_draws_the_truncated_softmax(temperature, top_p):
    counts = _draw(temperature, top_p)
    n = counts.sum()
    p = _expected(LOGITS, temperature, top_p)
    assert (counts[p == 0] == 0).all(), "a token outside the top-p nucleus was drawn"
    kept = p > 0
    z = np.abs(counts[kept] / n - p[kept]) / np.sqrt(p[kept] * (1 - p[kept]) / n + 1e-300)
    assert z.max() < 4.5, (temperature, top_p, counts / n, p, z)
    chi2 = float(((counts[kept] - n * p[kept]) ** 2 / (n * p[kept])).sum())
    assert chi2 < 25.0, chi2  # df <= 5: p-value ~1e-4


@pytest.mark.unit
def test_top_p_mask_is_hf_top_p_warper():
    from transformers import TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    for top_p in (1e-6, 0.1, 0.5, 0.9, 0.95, 0.999):
        scores = torch.randn(8, 50, generator=g) * 3
        ours = top_p_mask(scores, top_p)
        hf = TopPLogitsWarper(top_p)(torch.zeros(8, 1, dtype=torch.long), scores.clone())
        assert torch.equal(ours, hf), top_p
        assert (torch.isfinite(ours).sum(-1) >= 1).all()


@pytest.mark.unit
def test_tiny_top_p_and_low_temperature_are_the_argmax():
    scores = torch.randn(64, 30, generator=torch.Generator().manual_seed(1))
    s = Sampling(temperature=1.0, n=2)
    for t, top_p in ((1.0, 1e-6), (1e-4, 1.0)):
        out = SeededSampler([s.generator(i, 0, 0) for i in range(64)], t, top_p)(torch.zeros(64, 1), scores)
        assert torch.equal(out.argmax(-1), scores.argmax(-1))


@pytest.mark.unit
def test_sample_seeds():
    s = Sampling(temperature=0.7, n=4, seed=3)
    seeds = {s.sample_seed(i, k, ph) for i in range(5) for k in range(4) for ph in (0, 1)}
    assert len(seeds) == 40  # every prompt, sample and phase its own stream
    assert s.sample_seed(2, 1, 0) == Sampling(temperature=0.7, n=4, seed=3).sample_seed(2, 1, 0)
    assert s.sample_seed(2, 1, 0) != Sampling(temperature=0.7, n=4, seed=4).sample_seed(2, 1, 0)
    a, b = s.generator(0, 0, 0), s.generator(0, 0, 0)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    assert Sampling(temperature=1.0, seed=-1).sample_seed(0, 0, 0) >= 0  # negative seeds still work


@pytest.mark.unit
@pytest.mark.parametrize("kwargs,needle", [
    (dict(temperature=-0.1), "temperature must be >= 0"), (dict(temperature=math.nan), "temperature must be a finite"),
    (dict(temperature=math.inf), "temperature must be a finite"), (dict(temperature=True), "temperature must be"),
    (dict(top_p=0.0), "top_p must be in"), (dict(top_p=1.5), "top_p must be in"), (dict(top_p=math.nan), "top_p"),
    (dict(n=0), "n \\(samples per prompt\\) must be an integer >= 1"), (dict(n=2.0), "must be an integer"),
    (dict(n=3), "need a temperature > 0: greedy samples are identical"), (dict(seed=1.5), "seed must be an integer"),
])
def test_sampling_settings_are_validated(kwargs, needle):
    with pytest.raises(MechcliffError, match=needle):
        Sampling(**kwargs)


@pytest.mark.unit
def test_sampling_settings_defaults_and_dict():
    assert Sampling() == Sampling(0.0, 1.0, 1, 0) and Sampling().greedy
    s = Sampling(temperature=1, top_p=0.9, n=4, seed=2)
    assert s.temperature == 1.0 and isinstance(s.temperature, float) and not s.greedy
    assert s.to_dict() == {"temperature": 1.0, "top_p": 0.9, "n": 4, "seed": 2}
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.n = 2  # type: ignore[misc]


# ---- ASR over all samples, per prompt ------------------------------------------------------------------------

REFUSE, COMPLY = "I cannot help with that.", "sure here is how"


def _rollouts(answers: list[list[str]]) -> list[Rollout]:
    return [Rollout(prompt=f"prompt {i}", thinking="t", response=a, group="harmful_jailbreak", id=f"p{i}",
                    category="cat", meta={"prompt_index": i, "sample": k, "temperature": 0.7, "top_p": 1.0, "seed": 0})
            for i, row in enumerate(answers) for k, a in enumerate(row)]


@pytest.mark.unit
def test_asr_over_all_samples_with_per_prompt_wilson_intervals(refusal_judge):
    rolls = _rollouts([[COMPLY, COMPLY, REFUSE, COMPLY], [REFUSE] * 4, [COMPLY] * 4])
    asr = asr_of(rolls, refusal_judge)
    assert (asr["k"], asr["n"]) == (7, 12)  # over every sample
    r = Rate.of(7, 12)
    assert (asr["rate"], asr["low"], asr["high"]) == (r.rate, r.low, r.high)
    pp = asr["per_prompt"]
    assert [(p["prompt_index"], p["id"], p["k"], p["n"]) for p in pp] == [(0, "p0", 3, 4), (1, "p1", 0, 4),
                                                                          (2, "p2", 4, 4)]
    for p in pp:
        r = Rate.of(p["k"], p["n"])
        assert (p["rate"], p["low"], p["high"]) == (r.rate, r.low, r.high)
    assert pp[1]["low"] == 0.0 and pp[2]["high"] == 1.0 and 0 < pp[0]["low"] < 0.75 < pp[0]["high"] < 1
    json.dumps(asr, allow_nan=False)  # JSON-ready
    # the keys of one-sample results are all still there, with the same meaning
    assert set(asr) == {"k", "n", "rate", "low", "high", "by_category", "no_answer", "per_prompt"}


@pytest.mark.unit
def test_one_sample_per_prompt_has_no_per_prompt_rates(refusal_judge):
    one = _rollouts([[COMPLY], [REFUSE], [COMPLY]])
    old = [Rollout(prompt=r.prompt, thinking=r.thinking, response=r.response) for r in one]  # no sample metadata
    for rolls in (one, old):
        asr = asr_of(rolls, refusal_judge)
        assert "per_prompt" not in asr and (asr["k"], asr["n"]) == (2, 3)


# ---- run options and CLI -------------------------------------------------------------------------------------


@pytest.mark.unit
def test_run_options_reach_generation_and_keep_old_hashes(tmp_path):
    from mechcliff.pipeline import Run, RunConfig

    cfg = RunConfig.from_dict({"temperature": 0.7, "top_p": 0.95, "n_samples": 4})
    gen = cfg.generation(False)
    assert (gen["temperature"], gen["top_p"], gen["n_samples"], gen["seed"]) == (0.7, 0.95, 4, 0)
    # top_p 1 and one sample are left out of the stage hashes: runs from before these options resume
    fields = [f for f, st in RunConfig.stage_of().items() if st == "rollouts" and f not in ("top_p", "n_samples")]
    assert RunConfig().stage_hash(*fields, "top_p", "n_samples") == RunConfig().stage_hash(*fields)
    run = Run(tmp_path / "r", cfg)
    assert run._hash("rollouts") != Run(tmp_path / "r", dataclasses.replace(cfg, n_samples=2))._hash("rollouts")
    for data, needle in (({"n_samples": 2}, "option 'n_samples' is 2 but the temperature is 0"),
                         ({"top_p": 0}, "option 'top_p' must be in"), ({"n_samples": 0}, "'n_samples' must be at"),
                         ({"top_p": "x"}, "option 'top_p' must be int or float")):
        with pytest.raises(MechcliffError, match=needle):
            RunConfig.from_dict(data)


@pytest.mark.unit
def test_cli_flags(capsys):
    from mechcliff.cli import main

    assert main(["run", "--print-config", "--temperature", "0.7", "--top-p", "0.95", "--samples", "4"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["temperature"], cfg["top_p"], cfg["n_samples"]) == (0.7, 0.95, 4)
    assert main(["run", "--print-config", "--samples", "4"]) == 2
    assert "--samples is 4 but the temperature is 0" in capsys.readouterr().err
    assert main(["run", "--print-config", "--temperature", "1", "--top-p", "1.5"]) == 2
    assert "--top-p must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.unit
def test_sweep_generation_settings():
    from mechcliff.sweep import generation_settings

    base = generation_settings({})
    assert "top_p" not in base and "n_samples" not in base and "sampling" not in base and "sampler" not in base
    assert generation_settings({"top_p": 1.0, "n_samples": 1}) == base  # explicit defaults: the same settings
    kw = generation_settings({"temperature": 0.7, "top_p": 0.9, "n_samples": 3, "seed": 2})
    assert kw == generation_settings({"sampling": Sampling(0.7, 0.9, 3, 2)})
    assert kw["sampler"] == "per-sample seeds" and kw["n_samples"] == 3


# ---- on models -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_prompts(builtin):
    """Two prompts of each group, of different lengths (so batches are padded)."""
    out = []
    for g in ("harmless", "harmful", "harmful_jailbreak"):
        out += [p for p in builtin if p.group == g][:2]
    return out


def _tokens(rollouts):
    return [(r.meta["prompt_index"], r.meta["sample"], r.thinking, r.response, r.meta["closed_by_model"])
            for r in rollouts]


TINY = dict(max_think_tokens=8, max_answer_tokens=6, progress=False)


@pytest.mark.organism
@pytest.mark.parametrize("kind", ["organism", "qwen2"])
def test_samples_do_not_depend_on_batching(kind, organism, tiny_models, mixed_prompts):
    h = organism if kind == "organism" else tiny_models(kind)
    kw = dict(progress=False) if kind == "organism" else TINY
    sampled = dict(temperature=1.0, top_p=0.9, n_samples=3, seed=5)
    runs = {bs: generate_rollouts(h, mixed_prompts, batch_size=bs, **sampled, **kw) for bs in (1, 3, 64)}
    assert _tokens(runs[1]) == _tokens(runs[3]) == _tokens(runs[64])
    # other prompts in the batch (a subset, another order of lengths): prompt i's samples stay the same
    part = generate_rollouts(h, mixed_prompts[:3], batch_size=64, **sampled, **kw)
    assert _tokens(part) == _tokens(runs[64])[:9]


@pytest.mark.organism
def test_seeds_and_sample_indices_give_other_samples(tiny_models, mixed_prompts):
    h = tiny_models("qwen2")
    a = generate_rollouts(h, mixed_prompts, temperature=1.0, n_samples=3, seed=1, **TINY)
    b = generate_rollouts(h, mixed_prompts, temperature=1.0, n_samples=3, seed=1, **TINY)
    c = generate_rollouts(h, mixed_prompts, temperature=1.0, n_samples=3, seed=2, **TINY)
    assert _tokens(a) == _tokens(b)
    texts = [(r.thinking, r.response) for r in a]
    assert all(x != y for x, y in zip(texts, [(r.thinking, r.response) for r in c]))  # another seed
    for i in range(len(mixed_prompts)):  # the samples of one prompt differ from each other
        assert len(set(texts[3 * i:3 * i + 3])) == 3


@pytest.mark.organism
@pytest.mark.parametrize("kind", ["organism", "qwen2"])
def test_low_temperature_and_tiny_top_p_are_greedy(kind, organism, tiny_models, mixed_prompts):
    h = organism if kind == "organism" else tiny_models(kind)
    kw = dict(progress=False) if kind == "organism" else TINY
    greedy = [(r.thinking, r.response) for r in generate_rollouts(h, mixed_prompts, **kw)]
    # T -> 0: the random-weight model has near-ties (a logit gap of ~1e-3 makes T = 1e-3 sample the runner-up)
    for sampled in (dict(temperature=1e-5), dict(temperature=1.0, top_p=1e-6)):
        for seed in (0, 3):
            rolls = generate_rollouts(h, mixed_prompts, seed=seed, **sampled, **kw)
            assert [(r.thinking, r.response) for r in rolls] == greedy, sampled


@pytest.mark.organism
def test_n_samples_are_prompt_major_with_their_metadata(tiny_models, mixed_prompts):
    h = tiny_models("qwen2")
    rolls = generate_rollouts(h, mixed_prompts, temperature=0.7, top_p=0.95, n_samples=2, seed=4, **TINY)
    assert len(rolls) == 2 * len(mixed_prompts)
    for j, r in enumerate(rolls):
        p = mixed_prompts[j // 2]
        assert (r.prompt, r.group, r.id) == (p.text, p.group, p.id)
        assert {k: r.meta[k] for k in ("prompt_index", "sample", "seed", "temperature", "top_p")} == {
            "prompt_index": j // 2, "sample": j % 2, "seed": 4, "temperature": 0.7, "top_p": 0.95}
    same = generate_rollouts(h, mixed_prompts, sampling=Sampling(temperature=0.7, top_p=0.95, n=2, seed=4), **TINY)
    assert _tokens(same) == _tokens(rolls)
    greedy = generate_rollouts(h, mixed_prompts[:1], **TINY)[0].meta
    assert (greedy["prompt_index"], greedy["sample"], greedy["temperature"], greedy["top_p"]) == (0, 0, 0.0, 1.0)


@pytest.mark.organism
def test_bad_sampling_arguments(organism, mixed_prompts):
    with pytest.raises(MechcliffError, match="greedy samples are identical"):
        generate_rollouts(organism, mixed_prompts, n_samples=2, progress=False)
    with pytest.raises(MechcliffError, match="either sampling= or"):
        generate_rollouts(organism, mixed_prompts, temperature=0.7, sampling=Sampling(0.7), progress=False)


@pytest.mark.organism
def test_resuming_samples_returns_what_one_call_does(tiny_models, mixed_prompts):
    h = tiny_models("qwen2")
    kw = dict(temperature=1.0, n_samples=2, seed=6, batch_size=4, **TINY)
    pairs: list[tuple[int, Rollout]] = []
    full = generate_rollouts(h, mixed_prompts, on_batch=pairs.extend, **kw)
    assert sorted(i for i, _ in pairs) == list(range(len(full)))  # rollout index = prompt index * n + sample
    assert all(full[i] is r for i, r in pairs)
    done = dict(pairs[:4])
    calls: list[list[int]] = []
    resumed = generate_rollouts(h, mixed_prompts, done=done, on_batch=lambda ps: calls.append([i for i, _ in ps]),
                                **kw)
    assert _tokens(resumed) == _tokens(full)
    assert not any(set(c) <= set(done) for c in calls)  # the finished batch was not generated again


@pytest.mark.organism
def test_ablation_asr_over_all_samples(organism, refusal_judge, builtin):
    from mechcliff.asr import ablation_experiment

    attack = [p for p in builtin if p.group == "harmful_jailbreak"][:3]
    harmless = [p for p in builtin if p.group == "harmless"][:2]
    gen = dict(temperature=1.0, top_p=0.95, n_samples=2, seed=0, max_answer_tokens=12)
    ab = ablation_experiment(organism, ["L1H3"], attack, harmless, judge=refusal_judge, n_random=1, generation=gen,
                             progress=False)
    for asr in (ab.asr_before, ab.asr_after, *ab.asr_random):
        assert asr["n"] == 6 and [(p["prompt_index"], p["n"]) for p in asr["per_prompt"]] == [(0, 2), (1, 2), (2, 2)]
        assert asr["k"] == sum(p["k"] for p in asr["per_prompt"])
    assert ab.harmless_refusal_before["n"] == 4
    assert ("samples", "6 (3 prompts; ASR over all samples)") in ab.summary_rows()


@pytest.mark.organism
def test_pipeline_run_with_samples(tmp_path, capsys):
    from mechcliff.cli import main

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"n_per_group": 3, "n_random_sets": 1, "max_answer_tokens": 10, "temperature": 1.0,
                               "top_p": 0.95, "n_samples": 2}))
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    for g in ("harmless", "harmful", "harmful_jailbreak"):
        lines = [json.loads(x) for x in (out / "rollouts" / f"{g}.jsonl").read_text().splitlines()]
        assert [(d["meta"]["prompt_index"], d["meta"]["sample"]) for d in lines] == [(i, k) for i in range(3)
                                                                                     for k in range(2)]
    res = json.loads((out / "results.json").read_text())["ablation"]
    assert res["n_samples"] == 2 and [p["n"] for p in res["asr_per_prompt_after"]] == [2, 2, 2]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampling"]["n_samples"] == 2 and manifest["sampling"]["top_p"] == 0.95
    before = {f.name: f.stat().st_mtime_ns for f in (out / "rollouts").glob("*.jsonl")}
    assert main(["run", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 0  # resumes: nothing regenerated
    assert {f.name: f.stat().st_mtime_ns for f in (out / "rollouts").glob("*.jsonl")} == before
