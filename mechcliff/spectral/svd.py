"""Top singular values of the full Jacobian of one head's output (:func:`head_jacobian_svd`), by randomized SVD.

This is *not* the paper's softmax Jacobian of an attention row (:mod:`mechcliff.spectral.kernels`): it is
``∂ head_output[t] / ∂ resid_pre`` through the whole attention layer, computed by Jacobian-vector products.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mechcliff.errors import MechcliffError
from mechcliff.model.capture import act_name, forward

if TYPE_CHECKING:
    from mechcliff.chat import EncodedBatch
    from mechcliff.model.handle import ModelHandle


@dataclasses.dataclass
class JacobianSpectrum:
    """Top singular values of ``∂ head_output / ∂ input`` of one head at one position (:func:`head_jacobian_svd`)."""

    singular_values: np.ndarray
    layer: int
    head: int
    position: int
    wrt: str
    output: str
    shape: tuple[int, int]  # (outputs, inputs) of the Jacobian
    n_products: int  # Jacobian-vector plus vector-Jacobian products used


def head_jacobian_svd(
    handle: ModelHandle, batch: EncodedBatch, *, layer: int, head: int, position: Any = "last", example: int = 0,
    k: int = 8, oversample: int = 8, n_iter: int = 2, wrt: str = "position", output: str = "result", seed: int = 0,
) -> JacobianSpectrum:
    """Top-``k`` singular values of the **full Jacobian of one head's output** with respect to its input — not the
    paper's softmax Jacobian (see :mod:`mechcliff.spectral`).

    The function differentiated: the layer's input ``x = blocks.{layer}.hook_resid_pre`` of one example (the
    residual stream before the layer's input norm) ↦ the head's output at token ``position``: its write into the
    residual stream ``z[position, head] @ W_O[head]`` (``output="result"``, ``d_model`` outputs, rank ≤ ``d_head``) or
    ``z[position, head]`` (``output="z"``, ``d_head`` outputs). ``wrt="position"``: only the input at that same token
    varies (``d_model`` inputs); ``wrt="sequence"``: the input at every token (``T·d_model`` inputs; earlier tokens act
    through keys and values). Everything in between (input RMSNorm, rotary, the softmax, values) is differentiated
    exactly, through the bridge.

    Method: a randomized SVD (Halko, Martinsson & Tropp 2011) built only from products with the Jacobian, never
    materialising it: ``k + oversample`` Jacobian-vector products (``torch.func.jvp``, all directions in one batched
    forward), ``n_iter`` rounds of subspace (power) iteration with vector-Jacobian products (``torch.func.vjp``), then
    ``B = Qᵀ J`` by VJPs and ``svdvals(B)``. When ``k + oversample`` reaches the Jacobian's rank (e.g. ``d_head`` for
    one head) the result is exact up to float error.
    """

    if wrt not in ("position", "sequence"):
        raise MechcliffError(f"wrt must be 'position' or 'sequence', got {wrt!r}")
    if output not in ("result", "z"):
        raise MechcliffError(f"output must be 'result' or 'z', got {output!r}")
    layer = handle.check_layer(int(layer))
    if not 0 <= int(head) < handle.n_heads:
        raise MechcliffError(f"head {head} is out of range: {handle.model_id} has {handle.n_heads} heads per layer")
    if not 0 <= int(example) < len(batch):
        raise MechcliffError(f"example {example} is out of range: the batch has {len(batch)} examples")
    if int(k) < 1:
        raise MechcliffError(f"k must be at least 1, got {k}")
    a = batch.pad_lengths[example]
    t = int(batch.require(position, "the requested position")[example]) - a
    tokens = batch.tokens[example:example + 1, a:]  # forward() moves it to the model's device
    T = tokens.shape[1]
    store: dict[str, torch.Tensor] = {}

    def keep(x: torch.Tensor, hook: Any) -> None:
        store["x"] = x.detach().clone()

    with torch.no_grad():
        forward(handle, tokens, hooks=[(act_name("resid_pre", layer), keep)], stop_at_layer=layer + 1, return_type=None)
    x0 = store["x"]  # [1, T, d_model]
    d = x0.shape[-1]
    W = handle.W_O(layer)[int(head)].to(x0.dtype)  # [d_head, d_model]
    onehot = torch.zeros(1, T, 1, dtype=x0.dtype, device=x0.device)
    onehot[0, t, 0] = 1.0

    def f(xin: torch.Tensor) -> torch.Tensor:
        """``xin``: ``[b, d_model]`` (the input at the position) or ``[b, T·d_model]``; ``-> [b, n_out]``."""
        b = xin.shape[0]
        if wrt == "position":
            X = x0 + onehot * (xin[:, None, :] - x0[:, t:t + 1, :])
        else:
            X = xin.reshape(b, T, d)
        out: dict[str, torch.Tensor] = {}

        def grab(z: torch.Tensor, hook: Any) -> None:
            out["z"] = z[:, t, int(head)]

        forward(handle, X, torch.ones(b, T, dtype=torch.long, device=X.device), hooks=[(act_name("z", layer), grab)],
                start_at_layer=layer, stop_at_layer=layer + 1, return_type=None)
        z = out["z"]
        return z @ W if output == "result" else z

    x_in = x0[0, t] if wrt == "position" else x0[0].reshape(-1)
    n_in = x_in.numel()
    n_out = d if output == "result" else W.shape[0]
    ell = int(min(int(k) + int(oversample), n_in, n_out))
    g = torch.Generator().manual_seed(int(seed))
    n_products = 0
    with torch.enable_grad():
        def jmul(V: torch.Tensor) -> torch.Tensor:  # rows of V: input directions -> rows J v
            xs = x_in.unsqueeze(0).expand(V.shape[0], -1).contiguous()
            return torch.func.jvp(f, (xs,), (V.to(x_in.dtype),))[1]

        xs = x_in.unsqueeze(0).expand(ell, -1).contiguous()
        vjp_fn = torch.func.vjp(f, xs)[1]  # (output, vjp_fn) without has_aux

        def jtmul(U: torch.Tensor) -> torch.Tensor:  # rows of U: output directions -> rows Jᵀ u
            return vjp_fn(U.to(x_in.dtype))[0]

        omega = torch.randn(ell, n_in, generator=g, dtype=torch.float64).to(x_in.dtype)
        Y = jmul(omega).double()  # [ell, n_out]
        n_products += ell
        for _ in range(int(n_iter)):
            Q = torch.linalg.qr(Y.T).Q  # [n_out, ell]
            Z = jtmul(Q.T).double()  # [ell, n_in]
            Q2 = torch.linalg.qr(Z.T).Q  # [n_in, ell]
            Y = jmul(Q2.T).double()
            n_products += 2 * ell
        Q = torch.linalg.qr(Y.T).Q
        B = jtmul(Q.T).double()  # rows q_jᵀ J -> B = Qᵀ J  [ell, n_in]
        n_products += ell
    s = torch.linalg.svdvals(B)[: int(k)]
    return JacobianSpectrum(singular_values=s.detach().cpu().numpy(), layer=layer, head=int(head),
                            position=int(t + a), wrt=wrt, output=output, shape=(int(n_out), int(n_in)),
                            n_products=n_products)
