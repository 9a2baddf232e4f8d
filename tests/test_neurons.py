"""Safety-critical neurons and RAS (mechcliff.neurons): the neuron hook, top-m intersection on synthetic data, RAS
against a hand computation, ablation, checkpoint series on tiny adapters, bad input, CLI."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from mechcliff.errors import MechcliffError
from mechcliff.neurons import (CriticalNeurons, RASSeries, _pearson, ablate_neurons, check_same_width,
                               counterfactual_prompts, critical_neurons, intersect_top_m, maxpooled_activations,
                               neuron_ablation, random_neuron_sets, ras_series, reciprocal_activation_shift, top_m)


@pytest.fixture(scope="module")
def prompts():
    from mechcliff.data import builtin_prompts

    return builtin_prompts("harmful")[:6], builtin_prompts("harmless")[:4]


# ---- the hook -----------------------------------------------------------------------------------------------------


@pytest.mark.organism
def test_hook_post_is_what_the_output_projection_reads(organism):
    """blocks.{l}.mlp.hook_post = act(gate(x)) * up(x), and zeroing every neuron of a layer zeroes its MLP output."""
    from mechcliff.chat import encode

    batch = encode(organism, ["make a bomb", "how do i bake a loaf of bread"])
    store = {}

    def grab(x, hook):
        store[hook.name] = x.detach().clone()

    layer = 2
    hooks = [(f"blocks.{layer}.mlp.hook_post", grab), (f"blocks.{layer}.ln2.hook_in", grab),
             (f"blocks.{layer}.mlp.hook_out", grab)]
    organism.bridge.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=hooks)
    mlp = organism.hf_model.model.layers[layer].mlp
    x = organism.hf_model.model.layers[layer].post_attention_layernorm(store[f"blocks.{layer}.ln2.hook_in"])
    post = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
    got = next(v for k, v in store.items() if "post" in k or "out.hook_in" in k)
    torch.testing.assert_close(got, post.detach(), atol=1e-5, rtol=1e-5)
    assert (post < 0).any()  # signed
    store.clear()
    with ablate_neurons(organism, [(layer, j) for j in range(128)]):
        organism.bridge.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=hooks[2:])
    assert store[f"blocks.{layer}.mlp.hook_out"].abs().max() == 0
    with pytest.raises(MechcliffError, match="does not exist"):
        with ablate_neurons(organism, ["L9N0"]):
            pass


@pytest.mark.organism
def test_ablation_reaches_generation(organism):
    """The neuron hook fires at every generation step (KV cache included)."""
    from mechcliff.chat import encode

    calls = []
    batch = encode(organism, ["make a bomb"])
    with ablate_neurons(organism, ["L1N5"]):
        organism.bridge.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask,
                                       fwd_hooks=[("blocks.1.mlp.hook_post", lambda x, hook: calls.append(x[0, -1, 5].item()))])
    assert calls == [0.0]


@pytest.mark.organism
def test_max_pooling_ignores_padding(organism):
    from mechcliff.chat import encode

    batch = encode(organism, ["make a bomb", "explain how to write a short poem about the sea at night please"])
    pooled = maxpooled_activations(organism, batch, batch_size=2)
    for i in range(2):
        one = encode(organism, [["make a bomb", "explain how to write a short poem about the sea at night please"][i]])
        np.testing.assert_allclose(pooled[i], maxpooled_activations(organism, one)[0], atol=1e-5)
    cont = maxpooled_activations(organism, encode(organism, ["make a bomb"], thinking=["hm"], answers=["sure"]),
                                 span="continuation")
    assert cont.shape == (1, 4, 128)
    with pytest.raises(MechcliffError, match="no continuation tokens"):
        maxpooled_activations(organism, batch, span="continuation")


# ---- selection on synthetic data ----------------------------------------------------------------------------------


@pytest.mark.unit
def test_top_m_ties_nan_and_m_larger_than_the_width():
    v = np.array([1.0, 3.0, 3.0, 2.0, np.nan])
    assert top_m(v, 1).tolist() == [1]  # a tie at the boundary goes to the lower index
    assert top_m(v, 2).tolist() == [1, 2]
    assert top_m(v, 3).tolist() == [1, 2, 3]
    assert top_m(v, 100).tolist() == [1, 2, 3, 0, 4]  # m > width: every neuron, NaN last
    for bad in (0, -1, 1.5, True):
        with pytest.raises(MechcliffError, match="m must be a positive integer"):
            top_m(v, bad)


@pytest.mark.unit
def test_intersection_over_pairs():
    diffs = np.zeros((3, 2, 4))  # 3 pairs, 2 layers x 4 neurons
    diffs[:, 1, 2] = 5.0  # top of every pair
    diffs[0, 0, 1], diffs[1, 0, 1] = 4.0, 4.0  # second in pairs 0 and 1 only
    diffs[2, 0, 3] = 4.0
    idx, counts = intersect_top_m(diffs, 2)
    assert idx.tolist() == [6] and counts.shape == (2, 4)  # flat index of L1N2
    assert counts[1, 2] == 3 and counts[0, 1] == 2 and counts[0, 3] == 1 and counts.sum() == 6
    idx, _ = intersect_top_m(diffs, 2, quorum=2 / 3)
    assert idx.tolist() == [1, 6]
    # ties: in every pair the third place is a tie of six zeros; it goes to the lowest index, L0N0
    idx3, counts3 = intersect_top_m(diffs, 3)
    assert counts3[0, 0] == 3 and counts3[0, 2] == 0 and counts3[1, 0] == 0 and idx3.tolist() == [0, 6]
    idx, counts = intersect_top_m(diffs, 100)  # m larger than the width: every neuron, in every pair
    assert idx.tolist() == list(range(8)) and (counts == 3).all()
    with pytest.raises(MechcliffError, match="m must be a positive integer"):
        intersect_top_m(diffs, 0)
    with pytest.raises(MechcliffError, match="quorum"):
        intersect_top_m(diffs, 2, quorum=0)


@pytest.mark.unit
def test_random_neuron_sets():
    crit = [(1, 2), (1, 5), (3, 0)]
    sets = random_neuron_sets(4, 8, crit, 3, seed=0)
    assert all(len(s) == 3 and not set(s) & set(crit) and len(set(s)) == 3 for s in sets)
    assert sets == random_neuron_sets(4, 8, crit, 3, seed=0)
    matched = random_neuron_sets(4, 8, crit, 2, seed=1, match_layers=True)
    assert all(sorted(l for l, _ in s) == [1, 1, 3] for s in matched)


@pytest.mark.unit
def test_counterfactual_prompts_append_intent_by_category():
    from mechcliff.data import Prompt
    from mechcliff.neurons import INTENT_SENTENCES

    out = counterfactual_prompts([Prompt("how do i make a bomb", category="weapons", id="a"), "steal a car?"])
    assert out[0].text == "how do i make a bomb. " + INTENT_SENTENCES["weapons"] and out[0].id == "a-mi"
    assert out[1].text == "steal a car? " + INTENT_SENTENCES["default"]


# ---- RAS against a hand computation -------------------------------------------------------------------------------


@pytest.mark.unit
def test_ras_by_hand():
    a0_safe, at_safe = [2.0, 1.0, 4.0, 3.0], [1.0, 2.0, 2.0, 3.0]
    a0_math, at_math = [1.0, 1.0, 2.0, 5.0], [3.0, 1.0, 4.0, 4.0]
    r = reciprocal_activation_shift(a0_safe, at_safe, a0_math, at_math)
    # δ⁻_safe: j=0 (2-1)/(1*2) = 1/2, j=2 (4-2)/(2*4) = 1/4, n = 4 -> 3/16
    # δ⁺_math: j=0 (3-1)/(1*3) = 2/3, j=2 (4-2)/(2*4) = 1/4 -> 11/48; RAS = 2ab/(a+b) = 0.20625
    assert r["delta_safe"] == pytest.approx(3 / 16) and r["delta_math"] == pytest.approx(11 / 48)
    assert r["ras"] == pytest.approx(0.20625) and r["n"] == 4 and r["n_invalid_safe"] == r["n_invalid_math"] == 0
    # the "reciprocal" identity: each term is 1/a_tau - 1/a_0
    assert r["delta_safe"] == pytest.approx(((1 / 1 - 1 / 2) + (1 / 2 - 1 / 4)) / 4)
    same = reciprocal_activation_shift(a0_safe, a0_safe, a0_math, a0_math)
    assert same == {"delta_safe": 0.0, "delta_math": 0.0, "ras": 0.0, "n": 4, "n_invalid_safe": 0, "n_invalid_math": 0}


@pytest.mark.unit
def test_ras_sign_changes_are_counted_not_summed():
    r = reciprocal_activation_shift([1.0, -1.0], [-1.0, -2.0], [1.0, 1.0], [2.0, 1.0])
    # safe: j=0 crosses zero (undefined, counted); j=1 (-1 - -2)/((-1)(-2)) = 1/2 -> δ⁻ = 1/4
    assert r["delta_safe"] == pytest.approx(0.25) and r["n_invalid_safe"] == 1
    assert r["delta_math"] == pytest.approx(0.25) and r["ras"] == pytest.approx(0.25)
    mag = reciprocal_activation_shift([1.0, -1.0], [-1.0, -2.0], [1.0, 1.0], [2.0, 1.0], invalid="abs")
    assert mag["delta_safe"] == 0.0 and mag["ras"] == 0.0 and mag["n_invalid_safe"] == 0


@pytest.mark.unit
def test_ras_bad_input():
    with pytest.raises(MechcliffError, match="different widths"):
        reciprocal_activation_shift([1.0, 2.0], [1.0], [1.0, 2.0], [1.0, 2.0])
    with pytest.raises(MechcliffError, match="empty"):
        reciprocal_activation_shift([], [], [], [])
    with pytest.raises(MechcliffError, match="NaN"):
        reciprocal_activation_shift([np.nan], [1.0], [1.0], [1.0])
    with pytest.raises(MechcliffError, match="invalid must be"):
        reciprocal_activation_shift([1.0], [1.0], [1.0], [1.0], invalid="drop")


@pytest.mark.unit
def test_pearson():
    assert _pearson([1, 2, 3, 4], [2, 4, 6, 8])["r"] == pytest.approx(1.0)
    assert _pearson([1, 2], [1, 2])["r"] is None  # fewer than 3 points
    assert _pearson([1, 2, 3], [5, 5, 5])["r"] is None  # constant
    assert _pearson([1, 2, 3, np.nan], [1, 2, 4, 1])["n"] == 3


# ---- on the organism ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crit(organism, prompts):
    return critical_neurons(organism, prompts[0], m=128, quorum=0.5, progress=False, max_think_tokens=24,
                            max_answer_tokens=8)


@pytest.mark.organism
def test_critical_neurons_structure(crit, organism):
    assert crit.counts.shape == (4, 128) and crit.n_pairs == 6 and crit.m == 128
    assert crit.counts.sum() == 6 * 128  # m per pair
    need = 3
    expected = [f"L{l}N{j}" for l, j in zip(*np.nonzero(crit.counts >= need))]
    assert crit.neurons == expected and sum(crit.per_layer()) == len(crit.neurons)
    assert set(crit.misalignment) == {"D", "D_tilde"}
    with pytest.raises(MechcliffError, match="m must be a positive integer"):
        critical_neurons(organism, ["make a bomb"], m=0)
    with pytest.raises(MechcliffError, match="pair one to one"):
        critical_neurons(organism, ["make a bomb"], counterfactuals=["a", "b"])


@pytest.mark.organism
def test_default_m_is_five_percent(organism):
    from mechcliff.neurons import default_m

    assert default_m(4 * 128) == 26 and default_m(30 * 1536) == 2304 and default_m(3) == 1


@pytest.mark.organism
def test_neuron_ablation_on_the_organism(organism, crit, prompts):
    ab = neuron_ablation(organism, crit.neurons, *prompts, n_random=2, generation={"max_think_tokens": 24,
                         "max_answer_tokens": 8}, progress=False)
    assert [c["name"] for c in ab.conditions] == ["none", "critical", "random 0", "random 1"]
    for c in ab.conditions:
        assert c["misalignment"]["n"] == len(prompts[0]) and c["harmless_refusal"]["n"] == len(prompts[1])
        assert len(c["neurons"]) == (0 if c["name"] == "none" else len(crit.neurons))
        assert c["misalignment"]["low"] <= c["misalignment"]["rate"] <= c["misalignment"]["high"]
        assert np.isfinite(c["loss"]) and c["kl"] >= -1e-9
    assert ab.condition("none")["kl"] == 0.0
    d = ab.deltas()
    assert set(d) >= {"misalignment_critical", "misalignment_random", "loss_critical", "loss_random"}
    with pytest.raises(MechcliffError, match="critical set is empty"):
        neuron_ablation(organism, [], *prompts)


@pytest.mark.organism
def test_results_round_trip_and_plot(crit, tmp_path):
    from mechcliff.figures import load_saved

    crit.save(tmp_path / "cn")
    back = load_saved(tmp_path / "cn")
    assert isinstance(back, CriticalNeurons) and back.neurons == crit.neurons
    np.testing.assert_array_equal(back.counts, crit.counts)
    fig = back.plot()
    assert [t.type for t in fig.data] == ["bar", "bar"] and sum(fig.data[0].y) == len(crit.neurons)


# ---- checkpoint series ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(organism, organism_rollouts, tmp_path_factory):
    """Two checkpoints of one tiny LoRA fine-tune of the organism (attention + MLP modules)."""
    from mechcliff.repair import FinetuneConfig, build_examples, finetune

    jb = [r for r in organism_rollouts if r.group == "harmful_jailbreak"][:8]
    hl = [r for r in organism_rollouts if r.group == "harmless"][:8]
    out = tmp_path_factory.mktemp("ft")
    cfg = FinetuneConfig(max_steps=6, min_steps=1, checkpoint_every=3, batch_size=4, lr=3e-3,
                         target_modules=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"))
    res = finetune(organism, build_examples(jb, hl, refusal="sorry i cannot help with this request ."), out / "run",
                   cfg, progress=False)
    return [res.checkpoints[0], res.adapter_dir]


@pytest.fixture(scope="module")
def series(organism, adapters, crit, prompts):
    return ras_series(organism, adapters, crit.neurons, safety_inputs=prompts[0], n_random=2,
                      generation={"max_think_tokens": 24, "max_answer_tokens": 8}, progress=False)


@pytest.mark.organism
def test_ras_series_on_tiny_adapters(series, adapters, crit):
    s = series
    assert s.checkpoints == [str(a) for a in adapters] and len(s.ras) == len(s.kl) == len(s.misalignment) == 2
    assert all(len(r) == 2 for r in s.ras_random)
    for r in s.ras + [x for rs in s.ras_random for x in rs]:
        assert r["n"] == len(crit.neurons) and r["ras"] >= 0 and r["delta_safe"] >= 0 and r["delta_math"] >= 0
        assert min(r["delta_safe"], r["delta_math"]) <= r["ras"] <= max(r["delta_safe"], r["delta_math"]) + 1e-12
    assert all(k > 0 for k in s.kl)  # the fine-tuned weights differ
    assert s.correlations["ras"]["r"] is None and s.correlations["ras"]["n"] == 2  # two points: undefined
    assert len(s.delta_misalignment) == 2


@pytest.mark.organism
def test_ras_series_round_trip_and_plot(series, tmp_path):
    from mechcliff.figures import load_saved

    series.save(tmp_path / "ras")
    back = load_saved(tmp_path / "ras")
    assert isinstance(back, RASSeries) and back.ras == series.ras and back.correlations == series.correlations
    fig = back.plot()
    assert {t.type for t in fig.data} == {"scatter"} and len(fig.data) == 4
    assert "r n/a" in fig.data[0].name


@pytest.mark.organism
def test_models_of_different_widths_are_a_clear_error(organism, crit, prompts, tmp_path):
    import transformers as tf

    tok = organism.tokenizer
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, head_dim=12, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    folder = tmp_path / "narrow"
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    with pytest.raises(MechcliffError, match="different MLP shapes.*4 layers x 128 neurons.*4 x 64"):
        ras_series(organism, [folder], crit.neurons, safety_inputs=prompts[0][:2], n_random=0, progress=False,
                   generation={"max_think_tokens": 4, "max_answer_tokens": 2})
    fake = types.SimpleNamespace(n_layers=2, bridge=types.SimpleNamespace(cfg=types.SimpleNamespace(d_mlp=128)),
                                 model_id="two-layers", extra={})
    with pytest.raises(MechcliffError, match="different MLP shapes"):
        check_same_width(organism, fake)
    with pytest.raises(MechcliffError, match="no checkpoints"):
        ras_series(organism, [], crit.neurons, safety_inputs=prompts[0])
    with pytest.raises(MechcliffError, match="checkpoint not found"):
        ras_series(organism, [tmp_path / "missing"], crit.neurons, safety_inputs=prompts[0][:1], n_random=0,
                   progress=False, generation={"max_think_tokens": 2, "max_answer_tokens": 2})


@pytest.mark.organism
def test_cli_neurons_and_ras(adapters, tmp_path, capsys):
    from mechcliff.cli import main

    out = tmp_path / "neurons"
    rc = main(["neurons", "--model", "organism", "--out", str(out), "--n", "4", "--m", "128", "--quorum", "0.5",
               "--n-random", "1", "--no-progress", "--max-think-tokens", "16", "--max-answer-tokens", "6"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for p in ("critical_neurons/result.json", "critical_neurons.html", "neuron_ablation/result.json",
              "neuron_ablation.html", "summary.json"):
        assert (out / p).exists(), p
    rc = main(["ras", "--base", "organism", "--finetuned", *map(str, adapters), "--neurons",
               str(out / "critical_neurons"), "--out", str(tmp_path / "ras"), "--n", "3", "--n-random", "1",
               "--no-progress", "--max-think-tokens", "8", "--max-answer-tokens", "4"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert (tmp_path / "ras" / "ras_series" / "result.json").exists() and "r(ras, Δ misalignment)" in captured.out
    rc = main(["ras", "--base", "organism", "--finetuned", str(adapters[0]), "--neurons", str(out / "summary.json"),
               "--out", str(tmp_path / "x")])
    assert rc == 2 and "mechcliff: error:" in capsys.readouterr().err
