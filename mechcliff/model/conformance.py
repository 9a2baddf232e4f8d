"""Load-time conformance check: verify the hooks and every fast path, don't trust their names or versions.

TransformerLens issues #1191, #1317, #1639 and #1648 are all "right hook name, wrong tensor", and transformers 5.24
silently broke the bridge's KV-cached path (see :mod:`mechcliff.model.upstream`). So before any analysis,
:func:`check_conformance` runs on a short ragged, left-padded batch and compares each fast path mechcliff relies on
with its slow reference:

* ``hook_shapes``: ``hook_z`` is ``[batch, pos, n_heads, d_head]``, residual hooks are ``[batch, pos, d_model]``;
* ``heads_sum_to_attn_out``: ``sum_h z_h W_O[h] + b_O == hook_attn_out`` (what direct probe attribution needs);
* ``residual_additivity``: ``resid_pre + attn_out + mlp_out == resid_post`` and ``resid_post[l] == resid_pre[l+1]``;
* ``logits_vs_hf``: the bridge's logits equal those of the *unwrapped* Hugging Face model, computed before the
  bridge booted (the bridge wraps the HF modules in place, so afterwards there is no independent HF model left);
* ``padded_vs_single``: a left-padded batch equals the same prompts run one at a time, at the real tokens;
* ``cached_continuation``: a KV-cached suffix after a prefix equals the full forward (the patching engine's path);
* ``generation_vs_hf``: greedy generation through the bridge-wrapped model (as :mod:`mechcliff.generation` runs
  it) equals plain ``generate`` of the unwrapped model, token for token, on a ragged left-padded batch;
* ``hooks_fire``: every hook point mechcliff reads or writes fires once per forward and per generated token, and a
  write to it changes the output (a hook that never fires, or whose return value is dropped, is caught);
* ``plain_reads``: the fast reading path (:mod:`mechcliff.model.plain`: plain hooks on the HF modules while the
  model runs its own sdpa / flash attention) gives the bridge's ``resid_pre``, ``resid_post``, ``hook_z``,
  ``attn_out``, ``mlp_out`` and ``mlp.hook_post`` at every layer, ``hook_embed`` and ``ln_final.hook_out``. Only the sites that agree are read that way
  (``handle.extra["plain_sites"]``); the others, and everything on a model whose check did not run, are read through
  the bridge, so this check informs (``required=False``) and never changes a number;
* ``nested_hooks``: a hook context entered inside another, with ``run_with_hooks`` / ``run_with_cache`` calls
  inside it, stays active until its ``with`` block ends and is gone afterwards, leaving the outer one in place.

A failed check is an error at load (:class:`ConformanceError`), unless the caller passes ``check=False``.
Architectures with norms after the attention (Gemma 2/3 "sandwich" norms) fail ``heads_sum_to_attn_out`` by
design: there that check is informational (``required=False``), the model is flagged ``exact_decomposition=False``
and direct probe attribution is reported as not exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from mechcliff.errors import MechcliffError
from mechcliff.model.capture import SITES, act_name, layer_of
from mechcliff.model.sites import site_of

if TYPE_CHECKING:
    from mechcliff.model.handle import ModelHandle

# Short prompts of different lengths (so rows are left-padded differently); words the organism's vocabulary has too.
CHECK_TEXTS = ("how do i bake bread", "explain why the sky is blue in a short story about a cat", "the user asks")
GENERATION_TOKENS = 4
SUFFIX_TOKENS = 2


class ConformanceError(MechcliffError):
    """A conformance check failed at load time: results on this model (or these package versions) can't be trusted."""


@dataclass
class Check:
    name: str
    max_abs_error: float
    scale: float
    tolerance: float
    passed: bool
    required: bool = True
    detail: str = ""


@dataclass
class ConformanceReport:
    """Outcome of :func:`check_conformance`; stored on the handle and in every run manifest."""

    checks: list[Check] = field(default_factory=list)
    post_attention_norm: bool = False
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """True when every required check passed (informational checks may fail, e.g. on post-norm models)."""
        return all(c.passed for c in self.checks if c.required)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.required and not c.passed]

    @property
    def exact_decomposition(self) -> bool:
        """True when per-head writes add up exactly to the residual stream (DPA is exact)."""
        wanted = {"heads_sum_to_attn_out", "residual_additivity", "hook_shapes"}
        return not self.post_attention_norm and all(c.passed for c in self.checks if c.name in wanted)

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "exact_decomposition": self.exact_decomposition,
            "post_attention_norm": self.post_attention_norm,
            "checks": [asdict(c) for c in self.checks],
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        def one(c: Check) -> str:
            state = "ok" if c.passed else ("FAIL" if c.required else "differs (informational)")
            return f"{c.name}: {state} ({c.max_abs_error:.1e})"

        tail = "" if self.exact_decomposition else " -- per-head attribution is NOT exact on this architecture"
        return "conformance " + ("passed" if self.passed else "FAILED") + ": " + "; ".join(map(one, self.checks)) + tail

    def __str__(self) -> str:
        return self.summary()


POST_NORM_MODULES = ("post_feedforward_layernorm", "pre_feedforward_layernorm", "post_attn_norm")


def has_post_attention_norm(hf_model: torch.nn.Module) -> bool:
    """Detect sandwich norms (Gemma 2/3, OLMo 2): a norm applied to the attention output before the residual."""
    names = {n.rsplit(".", 1)[-1] for n, _ in hf_model.named_modules()}
    return any(m in names for m in POST_NORM_MODULES)


#: Relative tolerance of the conformance checks per weights dtype (of ``max(|reference|, 1)``), set with margin
#: over the largest relative error measured on the CPU (torch 2.13, transformers 5.23, TransformerLens 4.3) on the
#: organism and the tiny random Llama-GQA / Qwen2 / Qwen3 / Gemma3 models of the tests, over every check:
#:
#: ========  ==========================================================  =========
#: dtype     largest measured error (check, model)                         tolerance
#: ========  ==========================================================  =========
#: float32   6.9e-7 (logits_vs_hf / padded_vs_single, Qwen2)               1e-4
#: bfloat16  2.5e-2 (logits_vs_hf, Llama-GQA); sums 4.9e-3 (Qwen2)         6e-2
#: float16   3.0e-3 (logits_vs_hf, Llama-GQA); sums 5.1e-4 (Qwen2)         1e-2
#: ========  ==========================================================  =========
#:
#: (bfloat16 keeps 8 bits of mantissa, eps 3.9e-3; float16 11 bits, eps 4.9e-4: a few eps over a few layers.)
#: Gemma3's heads_sum_to_attn_out (0.48) is the informational check of post-attention norms, in every dtype.
TOLERANCES: dict[str, float] = {"float32": 1e-4, "bfloat16": 6e-2, "float16": 1e-2}


def _check(name: str, err: float, scale: float, rel_tol: float, *, required: bool = True, detail: str = "") -> Check:
    tol = rel_tol * max(scale, 1.0)
    ok = bool(err <= tol)  # NaN compares False: a NaN error fails
    return Check(name=name, max_abs_error=float(err), scale=float(scale), tolerance=float(tol), passed=ok,
                 required=required, detail=detail)


# ---- the unwrapped reference, taken before the bridge boots -------------------------------------------------

@dataclass
class HFReference:
    """Outputs of the plain Hugging Face model on the check batch, before the bridge wrapped its modules."""

    tokens: torch.Tensor  # [batch, pos], left padded
    attention_mask: torch.Tensor
    logits: torch.Tensor  # [batch, pos, vocab], float32, CPU
    generated: torch.Tensor  # [batch, GENERATION_TOKENS] greedy new tokens
    step_logits: torch.Tensor  # [batch, GENERATION_TOKENS, vocab] the logits each of them was chosen from


def check_batch(tokenizer: Any, device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The check batch: :data:`CHECK_TEXTS`, tokenized and left padded (ragged on purpose)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(CHECK_TEXTS), padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    tokens, mask = enc["input_ids"], enc["attention_mask"]
    if mask.sum(1).min() <= SUFFIX_TOKENS:
        raise MechcliffError("conformance check batch too short for this tokenizer")  # pragma: no cover
    return tokens.to(device), mask.to(device)


def _greedy(hf_model: Any, tokens: torch.Tensor, mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy new tokens and each step's logits ``[batch, step, vocab]``, with the keyword arguments
    :mod:`mechcliff.generation` uses (no stop tokens here, so every row makes :data:`GENERATION_TOKENS`)."""
    out = hf_model.generate(tokens, attention_mask=mask, max_new_tokens=GENERATION_TOKENS,
                            min_new_tokens=GENERATION_TOKENS, do_sample=False, temperature=None, top_p=None, top_k=None,
                            pad_token_id=pad_id, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, tokens.shape[1]:].cpu(), torch.stack(out.logits, 1).float().cpu()


@torch.no_grad()
def hf_reference(hf_model: Any, tokenizer: Any) -> HFReference:
    """Run the check batch through the unwrapped model (eager attention, as the bridge will run) and keep the outputs."""
    current = getattr(hf_model.config, "_attn_implementation", "eager")
    if current != "eager" and hasattr(hf_model, "set_attn_implementation"):
        hf_model._mechcliff_fast_attention = current  # the plain reading path runs it (mechcliff.model.plain)
        hf_model.set_attn_implementation("eager")  # the boot forces eager anyway; compare like with like
    from mechcliff.model.handle import input_device

    tokens, mask = check_batch(tokenizer, input_device(hf_model))
    logits = hf_model(tokens, attention_mask=mask).logits.float().cpu()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generated, step_logits = _greedy(hf_model, tokens, mask, pad)
    return HFReference(tokens=tokens, attention_mask=mask, logits=logits, generated=generated, step_logits=step_logits)


# ---- the checks ---------------------------------------------------------------------------------------------

def _real(mask: torch.Tensor) -> torch.Tensor:
    return mask.bool().cpu()


@torch.no_grad()
def _decomposition_checks(handle: ModelHandle, tokens: torch.Tensor, mask: torch.Tensor, report: ConformanceReport,
                          rel_tol: float) -> torch.Tensor:
    """Hook shapes, head sums and residual additivity from one cached forward; returns that forward's logits
    (the sums are skipped when a hook is missing or misshapen)."""
    bridge, n_layers = handle.bridge, handle.n_layers
    wanted = ("hook_z", "hook_attn_out", "hook_mlp_out", "hook_resid_pre", "hook_resid_post")
    logits, cache = bridge.run_with_cache(tokens, attention_mask=mask,
                                          names_filter=lambda n: n.endswith(wanted) or n == "hook_embed")
    b, p = tokens.shape
    expected: dict[str, tuple[int, ...]] = {act_name("z", layer): (b, p, handle.n_heads, handle.d_head)
                                            for layer in range(n_layers)}
    for layer in range(n_layers):
        for site in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
            expected[act_name(site, layer)] = (b, p, handle.d_model)
    missing = [n for n in expected if n not in cache.cache_dict]
    wrong = [n for n in expected if n in cache.cache_dict and tuple(cache[n].shape) != expected[n]]
    shapes_ok = not missing and not wrong
    detail = "; ".join(([f"{', '.join(missing[:3])} never fired"] if missing else [])
                       + ([f"{', '.join(wrong[:3])} not [batch, pos, n_heads, d_head] / [batch, pos, d_model]"]
                          if wrong else []))
    report.checks.append(Check("hook_shapes", 0.0 if shapes_ok else float("inf"), 1.0, 0.0, shapes_ok, detail=detail))
    if not shapes_ok:
        return logits
    real = _real(mask).to(tokens.device)
    head_err = add_err = chain_err = scale = 0.0
    for layer in range(n_layers):
        z = cache[act_name("z", layer)]
        attn_out = cache[act_name("attn_out", layer)]
        W_O, b_O = handle.W_O(layer), handle.b_O(layer)
        recon = torch.einsum("bphd,hdm->bpm", z.float(), W_O.float().to(z.device)) + b_O.float().to(z.device)
        head_err = max(head_err, (recon - attn_out.float())[real].abs().max().item())
        pre, post = cache[act_name("resid_pre", layer)].float(), cache[act_name("resid_post", layer)].float()
        mlp = cache[act_name("mlp_out", layer)].float()
        add_err = max(add_err, (pre + attn_out.float().to(pre.device) + mlp.to(pre.device) - post)[real].abs().max().item())
        if layer + 1 < n_layers:
            nxt = cache[act_name("resid_pre", layer + 1)].float().to(post.device)
            chain_err = max(chain_err, (post - nxt)[real].abs().max().item())
        scale = max(scale, post[real].abs().max().item(), attn_out[real].abs().max().item())
    embed_err = 0.0
    if "hook_embed" in cache:
        embed_err = (cache[act_name("embed")].float() - cache[act_name("resid_pre", 0)].float())[real].abs().max().item()
    report.checks.append(_check("heads_sum_to_attn_out", head_err, scale, rel_tol,
                                required=not report.post_attention_norm))
    report.checks.append(_check("residual_additivity", max(add_err, chain_err, embed_err), scale, rel_tol))
    return logits


def _logit_error(a: torch.Tensor, b: torch.Tensor, real: torch.Tensor) -> tuple[float, float]:
    a, b = a.float().cpu(), b.float().cpu()
    return (a - b)[real].abs().max().item(), b[real].abs().max().item()


@torch.no_grad()
def _padded_vs_single(handle: ModelHandle, tokens: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor, rel_tol: float) -> Check:
    err = scale = 0.0
    for i in range(tokens.shape[0]):
        keep = mask[i].bool()
        alone = handle.bridge(tokens[i:i + 1, keep], attention_mask=mask[i:i + 1, keep]).float().cpu()
        e, s = _logit_error(logits[i:i + 1, keep.cpu()], alone, torch.ones(alone.shape[:2], dtype=torch.bool))
        err, scale = max(err, e), max(scale, s)
    return _check("padded_vs_single", err, scale, rel_tol)


@torch.no_grad()
def _cached_continuation(handle: ModelHandle, tokens: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor,
                         rel_tol: float) -> Check:
    """Prefix with a KV cache, then the last :data:`SUFFIX_TOKENS` tokens on it, as the patching engine runs them."""
    P = tokens.shape[1] - SUFFIX_TOKENS
    _, cache = handle.bridge(tokens[:, :P], attention_mask=mask[:, :P], return_type="logits_and_cache")
    if cache is None:
        return _check("cached_continuation", float("inf"), 1.0, rel_tol, detail="the bridge returned no KV cache")
    suffix = handle.bridge(tokens[:, P:], attention_mask=mask, past_key_values=cache)
    err, scale = _logit_error(suffix, logits[:, P:], _real(mask[:, P:]))
    return _check("cached_continuation", err, scale, rel_tol)


@torch.no_grad()
def _generation(handle: ModelHandle, ref: HFReference, rel_tol: float) -> tuple[Check, int]:
    """Greedy generation through the wrapped model vs the unwrapped reference: the same tokens, and each step's
    logits within tolerance (a cache that is silently wrong can leave a short greedy run's tokens unchanged).
    Also counts ``hook_z`` calls per layer, for ``hooks_fire``."""
    calls = [0] * handle.n_layers

    def count(z: torch.Tensor, hook: Any) -> None:
        calls[layer_of(hook.name)] += 1

    pad = handle.tokenizer.pad_token_id
    with handle.bridge.hooks(fwd_hooks=[(act_name("z", l), count) for l in range(handle.n_layers)]):
        new, step_logits = _greedy(handle.hf_model, ref.tokens, ref.attention_mask, pad)
    differ = int((new != ref.generated).sum())
    err = (step_logits - ref.step_logits).abs().max().item()
    check = _check("generation_vs_hf", err, ref.step_logits.abs().max().item(), rel_tol)
    if differ:
        check.passed = False
        check.detail = f"{differ} of {new.numel()} greedy tokens differ from the unwrapped model's"
    return check, min(calls)


def hook_points(handle: ModelHandle) -> list[str]:
    """Every hook point mechcliff reads or writes (:data:`mechcliff.model.capture.SITES`, per layer, and
    ``hook_embed``) that exists on this model."""
    names = [act_name("embed")] + [act_name(site, l) for site in SITES for l in range(handle.n_layers)]
    return [n for n in names if n in handle.bridge.hook_dict]


@torch.no_grad()
def _hooks_fire(handle: ModelHandle, tokens: torch.Tensor, mask: torch.Tensor, generation_calls: int) -> Check:
    """Each hook fires once per forward; a write to it changes the logits (one forward per hook kind, one row per
    layer: row ``k`` perturbs layer ``k`` only)."""
    names = hook_points(handle)
    fired: dict[str, int] = {n: 0 for n in names}

    def counter(name: str) -> Callable:
        def count(x: torch.Tensor, hook: Any) -> None:
            fired[name] += 1

        return count

    # Writes are checked on the first two tokens of the shortest prompt: cost is rows x tokens, and rows are
    # layers x hook kinds (270 on SmolLM2).
    row = tokens[-1:, mask[-1].bool()][:, :2]
    row_mask = torch.ones_like(row)
    # In bfloat16 / float16 a small write into a saturated softmax (the organism's queries) rounds away entirely:
    # there the write also flips the activation's sign (which flips a saturated attention pattern); a write that
    # is dropped still changes nothing.
    sign = 1.0 if handle.dtype == torch.float32 else -1.0
    with handle.bridge.hooks(fwd_hooks=[(n, counter(n)) for n in names]):
        clean = handle.bridge(row, attention_mask=row_mask).float().cpu()
    problems = [f"{n} fired {c} times" for n, c in fired.items() if c != 1]
    if generation_calls < GENERATION_TOKENS:
        problems.append(f"attn.hook_z fired {generation_calls} times in a {GENERATION_TOKENS}-token generation")
    kinds: dict[str, list[str]] = {}
    for n in names:
        kinds.setdefault(n.split(".", 2)[-1] if n.startswith("blocks.") else n, []).append(n)

    def perturbation(k: int) -> Callable:
        def perturb(x: torch.Tensor, hook: Any) -> torch.Tensor:
            # Not a constant shift, which a LayerNorm downstream would remove: a ramp over the last dimension.
            ramp = torch.linspace(-1.0, 1.0, x.shape[-1], device=x.device, dtype=x.dtype)
            x = x.clone()
            x[k] = sign * x[k] + 0.5 * (x[k].abs().mean() + 1.0) * ramp
            return x

        return perturb

    for group in kinds.values():
        R = len(group)
        with handle.bridge.hooks(fwd_hooks=[(n, perturbation(k)) for k, n in enumerate(group)]):
            out = handle.bridge(row.repeat(R, 1), attention_mask=row_mask.repeat(R, 1)).float().cpu()
        change = (out - clean).abs().amax(dim=(1, 2))
        for k in (change <= 1e-6 * max(1.0, clean.abs().max().item())).nonzero().flatten().tolist():
            problems.append(f"writing to {group[k]} does not change the output")
    detail = "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
    return Check("hooks_fire", float(len(problems)), float(len(names)), 0.0, not problems, detail=detail)


@torch.no_grad()
def _nested_hooks(handle: ModelHandle, tokens: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor,
                  rel_tol: float = 1e-4) -> Check:
    """An ablation-like hook context inside an outer context, with ``run_with_hooks`` / ``run_with_cache`` calls
    inside it: active throughout its ``with`` block, gone after it; the outer context untouched."""
    name = act_name("z", handle.n_layers - 1)
    outer_calls = [0]

    def outer(z: torch.Tensor, hook: Any) -> None:
        outer_calls[0] += 1

    def ablate(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z = z.clone()
        z[:, :, 0] = 0.0
        return z

    bridge = handle.bridge
    clean = logits.float().cpu()
    real = _real(mask)
    problems = []
    with bridge.hooks(fwd_hooks=[(name, outer)]):
        with bridge.hooks(fwd_hooks=[(name, ablate)]):
            ablated = bridge(tokens, attention_mask=mask).float().cpu()
            bridge.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(name, lambda z, hook: None)])
            bridge.run_with_cache(tokens, attention_mask=mask, names_filter=name)
            again = bridge(tokens, attention_mask=mask).float().cpu()
        after_inner = bridge(tokens, attention_mask=mask).float().cpu()
        calls_inside = outer_calls[0]
    after = bridge(tokens, attention_mask=mask).float().cpu()
    scale = clean[real].abs().max().item()
    tol = max(rel_tol, 1e-4) * max(scale, 1.0)
    err = max((again - ablated)[real].abs().max().item(), (after_inner - clean)[real].abs().max().item(),
              (after - clean)[real].abs().max().item())
    if (ablated - clean)[real].abs().max().item() <= 1e-6 * max(scale, 1.0):
        problems.append("the inner hook context had no effect")
    if (again - ablated)[real].abs().max().item() > tol:
        problems.append("the inner hook context was removed by run_with_hooks / run_with_cache inside it")
    if (after_inner - clean)[real].abs().max().item() > tol or (after - clean)[real].abs().max().item() > tol:
        problems.append("a hook stayed active after its with block")
    if calls_inside != 5 or outer_calls[0] != 5:
        problems.append(f"the outer hook fired {calls_inside} times in 5 forwards")
    return Check("nested_hooks", err, scale, tol, not problems, detail="; ".join(problems))


@torch.no_grad()
def _plain_reads(handle: ModelHandle, tokens: torch.Tensor, mask: torch.Tensor, rel_tol: float) -> Check:
    """Both reading paths on the check batch, site by site over every layer; the sites that agree (to ``rel_tol``
    of their scale) are recorded in ``handle.extra["plain_sites"]`` for :func:`mechcliff.model.capture.capture`."""
    from mechcliff.model import plain

    handle.extra["plain_sites"] = []
    sites = plain.plain_sites(handle)
    if not sites:
        return Check("plain_reads", float("inf"), 1.0, 0.0, False, required=False,
                     detail="this architecture's modules are not laid out as the plain path expects: reads use the bridge")
    names = list(sites)
    ref: dict[str, torch.Tensor] = {}
    got: dict[str, torch.Tensor] = {}

    def keep(store: dict[str, torch.Tensor], name: str) -> Callable[..., None]:
        def hook(x: torch.Tensor, hook: Any = None) -> None:
            store[name] = x.detach().float().cpu().clone()
        return hook

    handle.bridge.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(n, keep(ref, n)) for n in names],
                                 return_type=None)
    try:
        plain.run(handle, tokens, mask, {n: keep(got, n) for n in names})
    except Exception as e:  # noqa: BLE001 - any failure of the plain path only means: read through the bridge
        return Check("plain_reads", float("inf"), 1.0, 0.0, False, required=False,
                     detail=f"the plain forward failed ({type(e).__name__}: {e}): reads use the bridge")
    real = _real(mask)
    by_site: dict[str, tuple[float, float]] = {}
    for n in names:
        site = site_of(n)
        if n not in ref or n not in got or ref[n].shape != got[n].shape:
            by_site[site] = (float("inf"), 1.0)
            continue
        err = (got[n] - ref[n])[real].abs().max().item()
        scale = ref[n][real].abs().max().item()
        e0, s0 = by_site.get(site, (0.0, 0.0))
        by_site[site] = (max(e0, err), max(s0, scale))
    ok = {site for site, (err, scale) in by_site.items() if err <= rel_tol * max(scale, 1.0)}
    handle.extra["plain_sites"] = sorted(n for n in names if site_of(n) in ok)
    handle.extra["plain_attention"] = plain.fast_attention(handle.hf_model)
    worst = max(by_site.items(), key=lambda kv: kv[1][0] / max(kv[1][1], 1.0))
    differ = sorted(set(by_site) - ok)
    detail = (f"{len(ok)}/{len(by_site)} sites read on the plain model ({handle.extra['plain_attention']})"
              + (f"; through the bridge: {', '.join(differ)}" if differ else ""))
    check = _check("plain_reads", worst[1][0], worst[1][1], rel_tol, required=False, detail=detail)
    check.passed = not differ  # decided site by site (a NaN error fails its site)
    return check


def tolerance_for(dtype: Any) -> float:
    """The relative tolerance of the checks for weights of ``dtype`` (:data:`TOLERANCES`; float32's for others)."""
    return TOLERANCES.get(str(dtype).removeprefix("torch."), TOLERANCES["float32"])


def check_conformance(handle: ModelHandle, reference: HFReference | None = None, rel_tol: float | None = None
                      ) -> ConformanceReport:
    """Run the conformance checks (see module docstring) and return the report.

    ``rel_tol`` (default: :func:`tolerance_for` the model's dtype, :data:`TOLERANCES`) is relative to the scale of
    what is compared (``max(|reference|, 1)``).

    ``reference`` holds the unwrapped model's outputs, taken before the bridge booted (:func:`hf_reference`;
    :func:`mechcliff.model.loading.load_model` does this). Without it, the two checks against the unwrapped model
    (``logits_vs_hf``, ``generation_vs_hf``) cannot run and are left out, with a note.
    """
    import time

    t0 = time.perf_counter()
    if rel_tol is None:
        rel_tol = tolerance_for(handle.dtype)
    report = ConformanceReport(post_attention_norm=has_post_attention_norm(handle.hf_model))
    if reference is not None:
        tokens, mask = reference.tokens, reference.attention_mask
    else:
        tokens, mask = check_batch(handle.tokenizer, handle.device)
    logits = _decomposition_checks(handle, tokens, mask, report, rel_tol).float().cpu()
    real = _real(mask)
    generation_calls = GENERATION_TOKENS
    if reference is not None:
        err, scale = _logit_error(logits, reference.logits, real)
        report.checks.append(_check("logits_vs_hf", err, scale, rel_tol))
    report.checks.append(_padded_vs_single(handle, tokens, mask, logits, rel_tol))
    report.checks.append(_cached_continuation(handle, tokens, mask, logits, rel_tol))
    if reference is not None:
        gen_check, generation_calls = _generation(handle, reference, rel_tol)
        report.checks.append(gen_check)
    else:
        report.notes.append("no unwrapped reference: logits_vs_hf and generation_vs_hf were not run")
    report.checks.append(_hooks_fire(handle, tokens, mask, generation_calls))
    report.checks.append(_plain_reads(handle, tokens, mask, rel_tol))
    shortest = tokens[-1:, mask[-1].bool()]
    report.checks.append(_nested_hooks(handle, shortest, torch.ones_like(shortest), logits[-1:, mask[-1].bool().cpu()],
                                       rel_tol))
    if report.post_attention_norm:
        report.notes.append(
            "post-attention norms (e.g. Gemma 2/3): head outputs pass through a norm before the residual stream, "
            "so direct probe attribution is a linearised approximation, not an exact decomposition"
        )
    report.seconds = time.perf_counter() - t0
    return report


def raise_if_failed(report: ConformanceReport, model_id: str, versions_note: Callable[[], str] | None = None) -> None:
    """Raise :class:`ConformanceError` naming the first failed check (and the others), with the way out."""
    failed = report.failed
    if not failed:
        return
    first = failed[0]
    what = first.detail or f"max |error| {first.max_abs_error:.3g} > tolerance {first.tolerance:.3g}"
    others = f" (also failed: {', '.join(c.name for c in failed[1:])})" if len(failed) > 1 else ""
    note = versions_note() if versions_note else ""
    note = f"; {note}" if note else ""
    raise ConformanceError(
        f"conformance check '{first.name}' failed on {model_id}: {what}{others}{note}. Results on this model cannot "
        "be trusted; pass check=False (--no-check on the command line) to load it anyway, which is recorded"
    )
