"""Load-time conformance check: verify the hooks, don't trust their names.

TransformerLens issues #1191, #1317, #1639 and #1648 are all "right hook name, wrong tensor". Before any analysis
we check, on a short input, the identities that direct probe attribution relies on:

* hook shapes (``hook_z`` is ``[batch, pos, n_heads, d_head]``, residual hooks are ``[batch, pos, d_model]``);
* the heads' writes through ``W_O`` sum to the attention output: ``sum_h z_h W_O[h] + b_O == hook_attn_out``;
* residual additivity: ``resid_pre + attn_out + mlp_out == resid_post`` and ``resid_post[l] == resid_pre[l+1]``;
* the bridge's logits equal the Hugging Face model's.

Architectures with norms after the attention (Gemma 2/3 "sandwich" norms) fail the second identity by design;
they are flagged ``exact_decomposition=False`` and direct probe attribution is then reported as not exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class Check:
    name: str
    max_abs_error: float
    scale: float
    tolerance: float
    passed: bool


@dataclass
class ConformanceReport:
    """Outcome of :func:`check_conformance`; stored on the handle and in every run manifest."""

    checks: list[Check] = field(default_factory=list)
    post_attention_norm: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def exact_decomposition(self) -> bool:
        """True when per-head writes add up exactly to the residual stream (DPA is exact)."""
        wanted = {"heads_sum_to_attn_out", "residual_additivity", "hook_shapes"}
        return not self.post_attention_norm and all(c.passed for c in self.checks if c.name in wanted)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "exact_decomposition": self.exact_decomposition,
            "post_attention_norm": self.post_attention_norm,
            "checks": [asdict(c) for c in self.checks],
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        parts = [f"{c.name}: {'ok' if c.passed else 'FAIL'} ({c.max_abs_error:.1e})" for c in self.checks]
        tail = "" if self.exact_decomposition else " -- per-head attribution is NOT exact on this architecture"
        return "conformance " + ("passed" if self.passed else "FAILED") + ": " + "; ".join(parts) + tail

    def __str__(self) -> str:
        return self.summary()


POST_NORM_MODULES = ("post_feedforward_layernorm", "pre_feedforward_layernorm", "post_attn_norm")


def has_post_attention_norm(hf_model: torch.nn.Module) -> bool:
    """Detect sandwich norms (Gemma 2/3, OLMo 2): a norm applied to the attention output before the residual."""
    names = {n.rsplit(".", 1)[-1] for n, _ in hf_model.named_modules()}
    return any(m in names for m in POST_NORM_MODULES)


def _check(name: str, err: float, scale: float, rel_tol: float) -> Check:
    tol = rel_tol * max(scale, 1.0)
    return Check(name=name, max_abs_error=float(err), scale=float(scale), tolerance=float(tol), passed=bool(err <= tol))


@torch.no_grad()
def check_conformance(handle: Any, tokens: torch.Tensor | None = None, rel_tol: float = 1e-4) -> ConformanceReport:
    """Run the conformance checks on ``tokens`` (default: a short chat-formatted prompt)."""
    bridge, n_layers = handle.bridge, handle.n_layers
    if tokens is None:
        from mechcliff.chat import encode

        tokens = encode(handle, ["Hello, how are you today?"], thinking=["Let me think."], answers=["Fine."]).tokens
    report = ConformanceReport(post_attention_norm=has_post_attention_norm(handle.hf_model))
    wanted = ("hook_z", "hook_attn_out", "hook_mlp_out", "hook_resid_pre", "hook_resid_post")
    logits, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n.endswith(wanted) or n == "hook_embed")
    b, p = tokens.shape
    shapes_ok = True
    for layer in range(n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"]
        shapes_ok &= tuple(z.shape) == (b, p, handle.n_heads, handle.d_head)
        for hook in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out"):
            shapes_ok &= tuple(cache[f"blocks.{layer}.{hook}"].shape) == (b, p, handle.d_model)
    report.checks.append(Check("hook_shapes", 0.0 if shapes_ok else float("inf"), 1.0, 0.0, shapes_ok))
    if not shapes_ok:
        report.notes.append("hook shapes differ from [batch, pos, n_heads, d_head] / [batch, pos, d_model]")
        return report
    head_err = add_err = chain_err = 0.0
    scale = 0.0
    for layer in range(n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"]
        attn_out = cache[f"blocks.{layer}.hook_attn_out"]
        recon = torch.einsum("bphd,hdm->bpm", z, handle.W_O(layer)) + handle.b_O(layer)
        head_err = max(head_err, (recon - attn_out).abs().max().item())
        pre, post = cache[f"blocks.{layer}.hook_resid_pre"], cache[f"blocks.{layer}.hook_resid_post"]
        add_err = max(add_err, (pre + attn_out + cache[f"blocks.{layer}.hook_mlp_out"] - post).abs().max().item())
        if layer + 1 < n_layers:
            chain_err = max(chain_err, (post - cache[f"blocks.{layer + 1}.hook_resid_pre"]).abs().max().item())
        scale = max(scale, post.abs().max().item(), attn_out.abs().max().item())
    embed_err = (cache["hook_embed"] - cache["blocks.0.hook_resid_pre"]).abs().max().item() if "hook_embed" in cache else 0.0
    report.checks.append(_check("heads_sum_to_attn_out", head_err, scale, rel_tol))
    report.checks.append(_check("residual_additivity", max(add_err, chain_err, embed_err), scale, rel_tol))
    hf_logits = handle.hf_model(tokens).logits
    report.checks.append(_check("logits_vs_hf", (hf_logits - logits).abs().max().item(), logits.abs().max().item(), rel_tol))
    if report.post_attention_norm:
        report.notes.append(
            "post-attention norms (e.g. Gemma 2/3): head outputs pass through a norm before the residual stream, "
            "so direct probe attribution is a linearised approximation, not an exact decomposition"
        )
    return report
