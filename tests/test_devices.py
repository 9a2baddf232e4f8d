"""Inputs reach the model's device through one function, :func:`mechcliff.model.capture.to_device`.

TransformerLens leaves a forward's inputs where the caller put them, so an analysis that calls the bridge (or
``generate``) with tensors it did not move works on the CPU and fails on a GPU. With one CPU here, the test marks
every tensor that ``to_device`` hands out and checks that each forward pass and each ``generate`` call of the
probe → trace → attribution → patching → ablation path receives only marked tensors: nothing reaches the model
without passing through the capture function, and nothing is moved twice.
"""

from __future__ import annotations

import pytest
import torch

from mechcliff.attribution import direct_probe_attribution
from mechcliff.generation import generate_rollouts
from mechcliff.interventions import intervene
from mechcliff.model import capture as capture_module
from mechcliff.patching import patch_heads
from mechcliff.probe import fit_probe
from mechcliff.trace import trace_refusal

pytestmark = pytest.mark.organism


@pytest.fixture
def moves(organism, monkeypatch):
    """Record every tensor handed to the model; ``to_device`` hands out fresh (marked) copies."""
    moved: dict[int, torch.Tensor] = {}  # id -> tensor (kept alive so that ids are not reused)
    seen: dict[str, list[bool]] = {"forward": [], "generate": [], "plain": []}
    real_to_device = capture_module.to_device

    def marking_to_device(handle, t):
        if t is None:
            return None
        assert id(t) not in moved, "a tensor was moved twice"
        out = real_to_device(handle, t).clone()
        moved[id(out)] = out
        return out

    def marked(*tensors):
        return all(id(t) in moved for t in tensors if isinstance(t, torch.Tensor))

    bridge, hf = organism.bridge, organism.hf_model
    real_forward, real_generate = bridge.forward, hf.generate

    def forward(input, *args, attention_mask=None, **kwargs):
        seen["forward"].append(marked(input, attention_mask))
        return real_forward(input, *args, attention_mask=attention_mask, **kwargs)

    def generate(input_ids=None, *args, attention_mask=None, **kwargs):
        seen["generate"].append(marked(input_ids, attention_mask))
        return real_generate(input_ids, *args, attention_mask=attention_mask, **kwargs)

    base = hf.base_model
    real_base_forward = base.forward

    def base_forward(*args, **kwargs):  # the fast reading path (mechcliff.model.plain): bridge components swapped out
        if type(base.layers[0]).__name__ != "BlockBridge":
            seen["plain"].append(marked(kwargs.get("input_ids"), kwargs.get("attention_mask")))
        return real_base_forward(*args, **kwargs)

    import sys

    for name, module in list(sys.modules.items()):  # every module that imported the function by name
        if (name == "mechcliff" or name.startswith("mechcliff.")) and getattr(module, "to_device", None) is real_to_device:
            monkeypatch.setattr(module, "to_device", marking_to_device)
    monkeypatch.setattr(bridge, "forward", forward)
    monkeypatch.setattr(hf, "generate", generate)
    monkeypatch.setattr(base, "forward", base_forward)
    return seen


def test_the_whole_path_moves_its_inputs_once(organism, organism_batch, organism_labels, builtin, moves):

    batch = organism_batch[:24]
    probe = fit_probe(organism, organism_batch, organism_labels, layer=organism.n_layers - 1, seed=0)
    trace_refusal(organism, batch, probe)
    direct_probe_attribution(organism, batch, probe)
    patch_heads(organism, batch[:4], batch[4:8], probe, heads=["L1H0", "L2H1"])
    patch_heads(organism, batch[:4], batch[4:8], probe, heads=["L1H0"], target_position="answer_start")
    with intervene(organism, ["L1H0"], mode="zero"):
        generate_rollouts(organism, builtin[:4], max_think_tokens=4, max_answer_tokens=4, progress=False)

    assert len(moves["forward"]) >= 5 and len(moves["generate"]) >= 1 and len(moves["plain"]) >= 3
    assert all(moves["forward"]), f"{moves['forward'].count(False)} forward pass(es) got inputs not moved by to_device"
    assert all(moves["plain"]), f"{moves['plain'].count(False)} plain forward(s) got inputs not moved by to_device"
    assert all(moves["generate"]), "generate got inputs not moved by to_device"


def test_the_check_fails_on_an_unmoved_input(organism, organism_batch, moves):
    """The recorder is not vacuous: a direct bridge call with the caller's tensors is caught."""
    organism.bridge(organism_batch.tokens[:2], attention_mask=organism_batch.attention_mask[:2])
    assert moves["forward"] == [False]
