"""Dtypes and devices: the organism in bfloat16 on the CPU, and offloaded to the CPU / disk with a device map.

* bfloat16: probe -> trace -> attribution -> patching -> ablation run, and their invariants hold to the bfloat16
  tolerance of :data:`mechcliff.model.conformance.TOLERANCES`; a probe fitted on the float32 load is accepted (the
  weights fingerprint is taken before the dtype cast).
* device_map with "cpu" and "disk" entries (accelerate offload): probe -> trace -> attribution give the plain
  load's numbers to float32 tolerance.
* the flags parse on ``mechcliff run --help`` / ``mechcliff check --help``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechcliff.attribution import direct_probe_attribution
from mechcliff.interventions import intervene
from mechcliff.model.conformance import TOLERANCES
from mechcliff.model.loading import load_model, weights_fingerprint
from mechcliff.patching import patch_heads, patch_heads_reference
from mechcliff.trace import trace_refusal

pytestmark = pytest.mark.organism

BF16 = TOLERANCES["bfloat16"]


@pytest.fixture(scope="module")
def organism_bf16():
    return load_model("organism", dtype="bfloat16")


def test_bf16_load_has_bf16_weights_bridge_and_the_float32_fingerprint(organism, organism_bf16):
    h = organism_bf16
    assert h.bridge.cfg.dtype == torch.bfloat16 and h.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in h.hf_model.parameters())
    assert h.conformance is not None and h.conformance.passed
    assert h.model_hash == organism.model_hash  # dtype-independent, and the old scheme on float32 weights
    assert weights_fingerprint(organism.hf_model) == organism.model_hash
    d = h.describe()
    assert (d["dtype"], d["device"], d["device_map"]) == ("bfloat16", "cpu", None)
    assert organism.describe()["dtype"] == "float32"


def test_bf16_pipeline_invariants(organism_bf16, organism_batch, organism_probe):
    h, batch, probe = organism_bf16, organism_batch[:16], organism_probe
    probe.check_model(h)  # a probe fitted on the float32 load is accepted on the bfloat16 load
    trace = trace_refusal(h, batch, probe)
    assert np.isfinite(trace.scores_flat).all()

    attr = direct_probe_attribution(h, batch, probe)
    scale = max(float(np.abs(attr.logit).max()), 1.0)
    assert attr.dtype == "bfloat16" and not attr.exact and attr.decomposition_exact
    assert "exact to float32" not in attr.exactness
    assert attr.max_residual == pytest.approx(attr.max_abs_error)
    assert attr.max_abs_error <= BF16 * scale, (attr.max_abs_error, scale)
    assert any(r == ("dtype", "bfloat16") for r in attr.summary_rows())

    fast = patch_heads(h, batch[:4], batch[4:8], probe, heads=["L1H0", "L2H1", "L3H2"])
    ref = patch_heads_reference(h, batch[:4], batch[4:8], probe, heads=["L1H0", "L2H1", "L3H2"])
    pscale = max(float(np.nanmax(np.abs(ref.per_example))), 1.0)
    err = float(np.nanmax(np.abs(fast.per_example - ref.per_example)))
    assert err <= BF16 * pscale, (err, pscale)

    def probe_logits(handle, b, pr):
        return trace_refusal(handle, b, pr).scores_flat

    clean = probe_logits(h, batch[:8], probe)
    with intervene(h, ["L1H0", "L2H1"], mode="scale_z", gamma=1.0):
        same = probe_logits(h, batch[:8], probe)
    assert np.abs(np.asarray(same) - np.asarray(clean)).max() == 0.0  # gamma = 1 is a no-op
    with intervene(h, ["L1H0", "L2H1"], mode="zero"):
        ablated = probe_logits(h, batch[:8], probe)
    assert np.abs(np.asarray(ablated) - np.asarray(clean)).max() > 0.0


def test_float32_attribution_still_claims_exactness(organism, organism_batch, organism_probe):
    attr = direct_probe_attribution(organism, organism_batch[:8], organism_probe)
    assert attr.exact and attr.dtype == "float32" and attr.exactness == "exact to float32 accumulation"
    assert attr.max_abs_error < 1e-4


def _half_on_disk(n_layers: int) -> dict[str, str]:
    """An accelerate device map of the organism: the first half of its layers on the CPU, the rest on the disk."""
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    return device_map | {f"model.layers.{i}": ("cpu" if i < n_layers // 2 else "disk") for i in range(n_layers)}


def test_offloaded_load_gives_the_plain_numbers(organism, organism_batch, organism_probe, tmp_path):
    n = organism.n_layers
    device_map = _half_on_disk(n)
    h = load_model("organism", device_map=device_map, offload_folder=tmp_path / "offload")
    assert any(tmp_path.joinpath("offload").iterdir())  # some layers really are on the disk
    assert h.device == torch.device("cpu") and h.describe()["device_map"]["model.layers.3"] == "disk"
    from mechcliff.model.capture import act_name
    from mechcliff.model.plain import verified_sites

    assert act_name("z", n - 1) in verified_sites(h)  # the reads below run on the plain path, offloaded layers too
    assert h.model_hash == organism.model_hash  # fingerprinted before the offload
    assert torch.equal(h.W_O(n - 1).cpu(), organism.W_O(n - 1).cpu())  # read back from the offload folder

    batch, probe = organism_batch[:12], organism_probe
    a, b = trace_refusal(organism, batch, probe), trace_refusal(h, batch, probe)
    np.testing.assert_allclose(b.scores_flat, a.scores_flat, rtol=1e-4, atol=1e-4)
    x, y = direct_probe_attribution(organism, batch, probe), direct_probe_attribution(h, batch, probe)
    np.testing.assert_allclose(y.per_example, x.per_example, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y.logit, x.logit, rtol=1e-4, atol=1e-4)
    assert y.exact and y.max_abs_error < 1e-4


def test_an_offloaded_bf16_load_has_the_float32_fingerprint(organism, tmp_path):
    """Offloading replaces the offloaded tensors (they go to the meta device, their values to the disk in the
    load's dtype): the fingerprint keeps the values sampled before the cast, keyed by name, not by tensor id."""
    h = load_model("organism", dtype="bfloat16", device_map=_half_on_disk(organism.n_layers), offload_folder=tmp_path,
                   check=False)
    assert h.dtype == torch.bfloat16 and h.describe()["device_map"]["model.layers.3"] == "disk"
    assert h.model_hash == organism.model_hash


def test_a_checkpoint_loaded_in_bf16_has_the_float32_fingerprint(tmp_path):
    """A folder loaded by Hugging Face straight into bfloat16 (and onto an offloading map) is fingerprinted from
    its files, so it matches the float32 load."""
    from mechcliff.model.organism import build_organism

    hf, tok, _ = build_organism(seed=0)
    hf.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    plain = load_model(tmp_path / "m", check=False)
    bf16 = load_model(tmp_path / "m", dtype="bfloat16", check=False)
    assert bf16.dtype == torch.bfloat16 and bf16.model_hash == plain.model_hash


def test_dtype_and_device_map_parse_on_the_command_line(capsys):
    from mechcliff.cli import _parser

    for command in ("run", "check"):
        with pytest.raises(SystemExit):
            _parser().parse_args([command, "--help"])
        text = capsys.readouterr().out
        assert "--device " in text and "--dtype" in text and "--device-map" in text, command
    args = _parser().parse_args(["check", "organism", "--dtype", "bfloat16", "--device-map", '{"model.layers.3": "disk"}'])
    assert args.dtype == "bfloat16" and args.device_map == {"model.layers.3": "disk"}
    args = _parser().parse_args(["run", "--dtype", "bfloat16", "--device-map", "auto", "--device", "cpu"])
    assert (args.dtype, args.device_map, args.device) == ("bfloat16", "auto", "cpu")
