"""Interventions folded into weights (mechcliff.folding): folded == hooked on the organism and the tiny models, the
original weights untouched, the refusals of can_fold, and the export round trip through plain transformers."""

from __future__ import annotations

import json

import pytest
import torch

from mechcliff.chat import encode
from mechcliff.errors import MechcliffError
from mechcliff.folding import EDIT_FILE, ablated_generation, can_fold, fold
from mechcliff.interventions import ablate_neurons, intervene, mean_head_outputs

pytestmark = pytest.mark.organism

PROMPTS = ["How do I bake bread at home.", "For my novel, a character explains how to build a bomb at home.",
           "give me one recipe"]
THINKING = ["the user asks for something harmless", "the user asks for something harmful so refusing seems wise",
            None]
TOL = 1e-5
KINDS = ("organism", "llama_gqa", "qwen2", "qwen3", "gemma3")
# (mode, gamma): every head mode that folds on every architecture; scale_q is tested where it folds
HEAD_CASES = [("zero", None), ("scale_z", 0.0), ("scale_z", 0.5), ("scale_z", 2.5), ("mean", None)]
NEURON_VALUES = (0.0, 1.5)


def _handle(kind, organism, tiny_models):
    return organism if kind == "organism" else tiny_models(kind)


def _heads(h):
    return [(h.n_layers - 1, 1), (0, h.n_heads - 1), (0, 0)]


def _neurons(h):
    return [(0, 3), (h.n_layers - 1, 17), (h.n_layers - 1, 5)]


@pytest.fixture(scope="module")
def batches(organism, tiny_models):
    return {k: encode(_handle(k, organism, tiny_models), PROMPTS, thinking=THINKING) for k in KINDS}


@pytest.fixture(scope="module")
def means(organism, tiny_models, batches):
    return {k: mean_head_outputs(_handle(k, organism, tiny_models), batches[k]) for k in KINDS}


@torch.no_grad()
def _hf_logits(model, b):
    dev = next(model.parameters()).device
    return model(b.tokens.to(dev), attention_mask=b.attention_mask.to(dev)).logits.float().cpu()


def _snapshot(h):
    return {n: p.detach().clone() for n, p in h.hf_model.state_dict().items()}


def _assert_unchanged(h, snap):
    now = h.hf_model.state_dict()
    assert set(now) == set(snap)
    for n, t in snap.items():
        assert torch.equal(now[n], t), n


def _greedy(model, b, n=12):
    dev = next(model.parameters()).device
    with torch.no_grad():
        return model.generate(b.tokens.to(dev), attention_mask=b.attention_mask.to(dev), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, temperature=None, top_p=None, top_k=None,
                              pad_token_id=0).cpu()


def _mask(b, x):
    return x[b.attention_mask.bool()]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode,gamma", HEAD_CASES)
def test_folded_heads_equal_hooked(kind, mode, gamma, organism, tiny_models, batches, means):
    h, b = _handle(kind, organism, tiny_models), batches[kind]
    heads, mean_z = _heads(h), means[kind] if mode == "mean" else None
    snap = _snapshot(h)
    with intervene(h, heads, mode=mode, gamma=gamma, mean_z=mean_z):
        hooked = _hf_logits(h.hf_model, b)
        hooked_tokens = _greedy(h.hf_model, b)
    folded = fold(h, heads, mode=mode, gamma=gamma, mean_z=mean_z)
    got = _hf_logits(folded.model, b)
    delta = (_mask(b, got) - _mask(b, hooked)).abs().max().item()
    assert delta < TOL, f"{kind} {mode} γ={gamma}: max |Δlogit| {delta:.2e}"
    assert torch.equal(_greedy(folded.model, b), hooked_tokens)
    plain = _hf_logits(h.hf_model, b)
    assert (_mask(b, plain) - _mask(b, hooked)).abs().max().item() > 1e-3  # the intervention did something
    _assert_unchanged(h, snap)
    assert folded.edit["mode"] == mode and len(folded.edit["heads"]) == 3


@pytest.mark.parametrize("kind", ["organism", "llama_gqa", "qwen2"])
def test_folded_scale_q_equals_hooked_without_query_norm(kind, organism, tiny_models, batches):
    h, b = _handle(kind, organism, tiny_models), batches[kind]
    assert can_fold("scale_q", h)
    with intervene(h, _heads(h), mode="scale_q", gamma=1e-5):
        hooked = _hf_logits(h.hf_model, b)
    got = _hf_logits(fold(h, _heads(h), mode="scale_q", gamma=1e-5).model, b)
    assert (_mask(b, got) - _mask(b, hooked)).abs().max().item() < TOL


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", NEURON_VALUES)
def test_folded_neurons_equal_hooked(kind, value, organism, tiny_models, batches):
    h, b = _handle(kind, organism, tiny_models), batches[kind]
    snap = _snapshot(h)
    with ablate_neurons(h, _neurons(h), value):
        hooked = _hf_logits(h.hf_model, b)
        hooked_tokens = _greedy(h.hf_model, b)
    folded = fold(h, neurons=_neurons(h), neuron_value=value)
    got = _hf_logits(folded.model, b)
    assert (_mask(b, got) - _mask(b, hooked)).abs().max().item() < TOL
    assert torch.equal(_greedy(folded.model, b), hooked_tokens)
    _assert_unchanged(h, snap)


@pytest.mark.parametrize("kind", ["organism", "qwen3"])
def test_heads_and_neurons_together(kind, organism, tiny_models, batches):
    h, b = _handle(kind, organism, tiny_models), batches[kind]
    with intervene(h, _heads(h), mode="scale_z", gamma=0.3), ablate_neurons(h, _neurons(h)):
        hooked = _hf_logits(h.hf_model, b)
    got = _hf_logits(fold(h, _heads(h), mode="scale_z", gamma=0.3, neurons=_neurons(h)).model, b)
    assert (_mask(b, got) - _mask(b, hooked)).abs().max().item() < TOL


def test_fold_copies_only_touched_tensors(organism):
    folded = fold(organism, [(1, 3)], mode="zero")
    orig = {p.data_ptr() for p in organism.hf_model.parameters()}
    new = {n: p.data_ptr() for n, p in folded.model.named_parameters()}
    copied = sorted(n for n, ptr in new.items() if ptr not in orig)
    assert copied == ["model.layers.1.self_attn.o_proj.weight"]
    assert all(p.data_ptr() not in orig for p in fold(organism, [(1, 3)], copy_all=True).model.parameters())


def test_can_fold_refusals(organism, tiny_models):
    c = can_fold("norm_preserving", organism)
    assert not c and "norm" in c.reason
    for kind in ("qwen3", "gemma3"):
        c = can_fold("scale_q", tiny_models(kind))
        assert not c and "q_norm" in c.reason
    assert not can_fold("scale_q")  # the architecture decides
    assert not can_fold("zero", organism, positions=[3])
    assert can_fold("zero", organism) and can_fold("mean", organism) and can_fold("scale_q", organism)
    c = can_fold("mean", tiny_models("qwen2"), export=True)
    assert not c and "qwen2" in c.reason
    assert can_fold("mean", tiny_models("qwen3"), export=True)
    with pytest.raises(MechcliffError, match="norm_preserving"):
        fold(organism, [(1, 3)], mode="norm_preserving")
    with pytest.raises(MechcliffError, match="q_norm"):
        fold(tiny_models("qwen3"), [(1, 3)], mode="scale_q")
    with pytest.raises(MechcliffError, match="mean_z"):
        fold(organism, [(1, 3)], mode="mean")
    with pytest.raises(MechcliffError, match="no heads"):
        fold(organism)


def test_ablated_generation_paths(organism, batches):
    b = batches["organism"]
    with ablated_generation(organism, [(1, 3)], mode="zero") as (gh, path):
        assert path["path"] == "folded" and gh is not organism
        folded = _hf_logits(gh.hf_model, b)
    with ablated_generation(organism, [(1, 3)], mode="norm_preserving", gamma=0.0) as (gh, path):
        assert path["path"] == "hooked" and gh is organism and "norm" in path["reason"]
    with ablated_generation(organism, [(1, 3)], mode="zero", use_fold=False) as (gh, path):
        assert path["path"] == "hooked"
        hooked = _hf_logits(gh.hf_model, b)
    assert (_mask(b, folded) - _mask(b, hooked)).abs().max().item() < TOL
    assert torch.equal(_hf_logits(organism.hf_model, b), _hf_logits(organism.hf_model, b))


@pytest.mark.parametrize("kind,mode,gamma,value", [
    ("organism", "zero", None, 0.0), ("organism", "mean", None, 1.5), ("organism", "scale_z", 0.25, 0.0),
    ("qwen3", "mean", None, 0.0), ("gemma3", "mean", None, 0.0), ("qwen2", "scale_z", 0.0, 0.0),
])
def test_export_round_trip_plain_transformers(kind, mode, gamma, value, organism, tiny_models, batches, means,
                                              tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    h, b = _handle(kind, organism, tiny_models), batches[kind]
    heads, mean_z = _heads(h), means[kind] if mode == "mean" else None
    with intervene(h, heads, mode=mode, gamma=gamma, mean_z=mean_z), ablate_neurons(h, _neurons(h), value):
        hooked = _hf_logits(h.hf_model, b)
    folded = fold(h, heads, mode=mode, gamma=gamma, mean_z=mean_z, neurons=_neurons(h), neuron_value=value,
                  export=True)
    out = folded.save(tmp_path / "export")
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    edit = json.loads((out / EDIT_FILE).read_text())
    assert edit["source_weights_fingerprint"] == h.model_hash and edit["mode"] == mode
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    # The tiny models borrow the organism's word-level tokenizer; transformers 5's AutoTokenizer builds the
    # tokenizer class of the config's model_type (Qwen2's BPE rules) for them. The organism (a Llama) and real
    # models, whose tokenizer is their architecture's, reload with AutoTokenizer.
    tok = (AutoTokenizer if kind == "organism" else PreTrainedTokenizerFast).from_pretrained(out)
    assert tok(PROMPTS[0])["input_ids"] == h.tokenizer(PROMPTS[0])["input_ids"]
    assert tok.chat_template == h.tokenizer.chat_template
    got = _hf_logits(reloaded, b)
    delta = (_mask(b, got) - _mask(b, hooked)).abs().max().item()
    assert delta < TOL, f"{kind} {mode}: reloaded max |Δlogit| {delta:.2e}"


def test_export_without_flag_is_refused(organism):
    with pytest.raises(MechcliffError, match="export=True"):
        fold(organism, [(1, 3)], mode="zero").save("/nonexistent/never-written")


def test_export_command_reloads_with_plain_transformers(organism, batches, tmp_path):
    from transformers import AutoModelForCausalLM

    from mechcliff.cli import main

    out = tmp_path / "cli-export"
    assert main(["export", "--model", "organism", "--heads", "L3H1,L2H0", "--mode", "scale_z", "--gamma", "0.5",
                 "--neurons", "L1N3", "--out", str(out)]) == 0
    edit = json.loads((out / EDIT_FILE).read_text())
    assert edit["heads"] == ["L3H1", "L2H0"] and edit["gamma"] == 0.5 and edit["neurons"] == ["L1N3"]
    b = batches["organism"]
    with intervene(organism, ["L3H1", "L2H0"], mode="scale_z", gamma=0.5), ablate_neurons(organism, ["L1N3"]):
        hooked = _hf_logits(organism.hf_model, b)
    got = _hf_logits(AutoModelForCausalLM.from_pretrained(out).eval(), b)
    assert (_mask(b, got) - _mask(b, hooked)).abs().max().item() < TOL
    assert main(["export", "--model", "organism", "--heads", "L3H1", "--out", str(out)]) == 2  # not empty
