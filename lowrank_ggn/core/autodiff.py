r"""The autodiff toolbox every stage uses: per-sample VJPs, one-hot cotangents, JVPs.

With ``F(θ, X)`` the batch function (:class:`~lowrank_ggn.core.model.FunctionalModel`)
and ``f(θ, x)`` its per-sample restriction:

* :func:`per_sample_vjps`: ``J_θ f(x_n)ᵀ w_n`` for each sample, optionally for
  several cotangents per sample (``vmap`` over samples of a ``vjp``); valid on the
  per-sample path only;
* :func:`one_hot_cotangents`: ``e_n ⊗ w_n``, the cotangents whose full-batch VJPs
  ``J_θF(X)ᵀ (e_n ⊗ w_n) = J_θF_nᵀ w_n`` are per-component quantities on any path;
* :func:`batch_jvps`: ``J_θF(X) · t_k`` for parameter tangents (forward mode);
* :func:`graph_jvps`: the same products from a retained autograd graph with two
  reverse-mode passes, ``J t = ∂/∂w ⟨Jᵀ w, t⟩``: no forward pass, and it works for
  modules without forward-mode AD.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from lowrank_ggn.core.model import FunctionalModel


def per_sample_vjps(
    fmodel: FunctionalModel, inputs: Tensor, cotangents: Tensor, columns: bool = False
) -> tuple[Tensor, ...]:
    """``J_θ f(x_n)ᵀ w_n`` per sample, as per-parameter tensors.

    Args:
        fmodel: The model (its :meth:`~FunctionalModel.single` is differentiated).
        inputs: ``[B, *in]``.
        cotangents: ``[B, *out]``, or ``[B, C, *out]`` with ``columns=True``.
        columns: ``C`` cotangents per sample (one forward, ``C`` backward each).

    Returns:
        Per parameter ``[B, *θ_p]`` (``[B, C, *θ_p]`` with ``columns``).
    """
    theta = fmodel.primals()

    def sample(x: Tensor, w: Tensor) -> tuple[Tensor, ...]:
        _, fn = vjp(lambda th: fmodel.single(th, x), theta)
        return vmap(fn)(w)[0] if columns else fn(w)[0]

    return vmap(sample)(inputs, cotangents)


def one_hot_cotangents(values: Tensor, start: int, batch_size: int) -> Tensor:
    """``e_n ⊗ w_n`` for ``n = start, start+1, …``: ``[B, *out] -> [B, N, *out]``."""
    B = values.shape[0]
    cot = values.new_zeros(B, batch_size, *values.shape[1:])
    rows = torch.arange(B, device=values.device)
    cot[rows, rows + start] = values
    return cot


def batch_jvps(
    fmodel: FunctionalModel, inputs: Tensor, tangents: Tensor, chunk: int
) -> Tensor:
    """``J_θF(X) · t_k`` for flat tangents ``[K, D]``: ``[K, N, *out]`` (forward mode)."""
    theta = fmodel.primals()

    def push(t: Tensor) -> Tensor:
        return jvp(lambda th: fmodel(th, inputs), (theta,), (fmodel.unflatten(t),))[1]

    return vmap(push, chunk_size=max(1, chunk))(tangents)


def graph_jvps(
    graph: Tensor, params: list[Tensor], tangents: tuple[Tensor, ...]
) -> Tensor:
    """``J t_k`` from the graph of ``graph = F(θ, X)`` by double backward.

    ``g(w) = Jᵀ w`` is linear in the cotangent ``w``, so ``∂⟨g(w), t⟩/∂w = J t``:
    one backward pass with ``create_graph`` builds ``g``, one batched backward pass
    per chunk of tangents differentiates it.

    Args:
        graph: The batch outputs ``[N, *out]`` in the autograd graph of ``params``.
        params: The parameters.
        tangents: Per parameter ``[K, *θ_p]``.

    Returns:
        ``[K, N, *out]``.
    """
    K = tangents[0].shape[0] if tangents else 0
    w = torch.zeros_like(graph, requires_grad=True)
    with torch.enable_grad():
        grads = torch.autograd.grad(
            graph, params, w, create_graph=True, allow_unused=True
        )
    used = [
        (g, t) for g, t in zip(grads, tangents) if g is not None and g.requires_grad
    ]
    if not used or K == 0:
        return graph.new_zeros(K, *graph.shape)
    outs, tans = zip(*used)
    try:
        (Jt,) = torch.autograd.grad(
            outs, w, tans, retain_graph=True, is_grads_batched=True, allow_unused=True
        )
    except RuntimeError:  # no batching rule for a double-backward op: one by one
        Jt = torch.stack(
            [
                torch.autograd.grad(
                    outs, w, [t[k] for t in tans], retain_graph=True, allow_unused=True
                )[0]
                for k in range(K)
            ]
        )
    return graph.new_zeros(K, *graph.shape) if Jt is None else Jt.detach()


__all__ = ["batch_jvps", "graph_jvps", "one_hot_cotangents", "per_sample_vjps"]
