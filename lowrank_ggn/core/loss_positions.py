r"""Cross-entropy over positions: closed-form factors for any loss that is one.

Language models are trained with cross-entropy over the positions of a sequence,
written the usual way as a function of ``[N, T, V]`` logits (classes last):
``F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1))``, with shifted labels
and ``ignore_index=-100`` (Hugging Face), or ``reduction='sum'``. Any such loss is

.. math::
    L(F) = \sum_{n, t} w_{nt}\, \operatorname{CE}(F_{nt}, ŷ_{nt}),

with weights ``w_{nt} ≥ 0`` that do not depend on ``F`` (``1/#tokens``, zero at
ignored positions). Its Hessian is block diagonal over positions,
``∇²_{F_{nt}} L = w_{nt} (\operatorname{diag} p − p pᵀ)`` with ``p = softmax(F_{nt})``,
whatever the labels; so the closed-form square root of
:mod:`lowrank_ggn.core.loss_factors` applies per position (``V`` columns per position,
``C = T·V`` per sample), and its Monte-Carlo factors (one categorical draw per
position, packed into ``M`` columns per sample, unbiased since draws at different
positions are independent with mean zero) need no ``[T·V, T·V]`` Hessian at all.

**Recognition** (:func:`position_ce_weights`), numerically, for any callable loss on
outputs whose last dimension holds the classes: the gradient must have the form
``g_{nt} = w_{nt} (p_{nt} − e_{ŷ_{nt}})``, which gives ``ŷ = argmin g`` and
``w = −g_ŷ / (1 − p_ŷ)`` (the entries of ``g`` sum to zero); then one Hessian-vector
product along a random ``v`` must equal ``w (p ⊙ v − p (pᵀ v))`` at every position.
Two Hessians that differ agree along a random direction with probability zero, so a
recognised loss has exactly this Hessian. Label smoothing, class weights or any
other loss fail the test and keep the autodiff factors
(:mod:`lowrank_ggn.core.loss_hessians`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lowrank_ggn.core.tolerances import roundoff_close


def position_ce_weights(
    loss: Callable[[Tensor], Tensor], outputs: Tensor
) -> Tensor | None:
    """``w`` ``[N, *pos]`` if ``loss(F)`` is cross-entropy over positions, else ``None``.

    Args:
        loss: The batch loss as a function of the outputs (targets bound).
        outputs: ``[N, *pos, V]``, classes last (``V ≥ 2``).

    Example:
        >>> import torch
        >>> F = torch.randn(2, 3, 4, dtype=torch.float64)
        >>> y = torch.tensor([[0, 1, -100], [3, 2, 1]])
        >>> ce = torch.nn.functional.cross_entropy
        >>> w = position_ce_weights(lambda o: ce(o.reshape(-1, 4), y.reshape(-1)), F)
        >>> assert torch.allclose(w, (y != -100).double() / 5)
    """
    if outputs.dim() < 2 or outputs.shape[-1] < 2 or not outputs.is_floating_point():
        return None
    F = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        value = loss(F)
        if not isinstance(value, Tensor) or value.numel() != 1:
            return None
        (g,) = torch.autograd.grad(value.reshape(()), F, create_graph=True)
    if not g.requires_grad:  # linear in F: not a cross-entropy
        return None
    p = F.detach().softmax(-1)
    gd = g.detach()
    label = gd.argmin(-1, keepdim=True)
    w = -gd.gather(-1, label) / (1 - p.gather(-1, label)).clamp_min(1e-30)
    onehot = torch.zeros_like(p).scatter_(-1, label, 1.0)
    if (w < 0).any() or not roundoff_close(gd, w * (p - onehot)):
        return None
    gen = torch.Generator(device="cpu").manual_seed(4321)
    v = torch.randn(F.shape, generator=gen, dtype=F.dtype).to(F.device)
    (Hv,) = torch.autograd.grad(g, F, v)
    pv = p * v
    if not roundoff_close(Hv, w * (pv - p * pv.sum(-1, keepdim=True))):
        return None
    return w.squeeze(-1)


def ce_factors(probs: Tensor, weight: Tensor | float) -> Tensor:
    r"""Exact factors of ``Σ_pos weight (diag p − p pᵀ)``: ``[K·P, N, K, *pos]``.

    Args:
        probs: ``softmax`` along dim 1, ``[N, K, *pos]`` (``P = Π pos``).
        weight: ``[N, *pos]`` or a number (reduction factor and target weights).

    Column ``(k, q)`` acts on position ``q`` only and is ``√(w p_k) (e_k − p)`` there.
    """
    N, K, pos = probs.shape[0], probs.shape[1], probs.shape[2:]
    P = math.prod(pos)
    sqrt_p = probs.sqrt()
    eye = torch.eye(K, dtype=probs.dtype, device=probs.device)
    eye = eye.reshape(1, K, K, *([1] * (probs.dim() - 2)))
    # [N, K_row, K_col, *pos]: column k is √p_k (e_k − p)
    root = (eye - probs.unsqueeze(2)) * sqrt_p.unsqueeze(1)
    if isinstance(weight, Tensor):  # [N, *pos]
        root = root * weight.sqrt().unsqueeze(1).unsqueeze(1)
    else:
        root = root * math.sqrt(weight)
    root = root.reshape(N, K, K, P)
    # S[(k, q), n, :, q'] = δ_{qq'} root[n, :, k, q]
    eye_p = torch.eye(P, dtype=probs.dtype, device=probs.device)
    S = torch.einsum("nrkq,qs->kqnrs", root, eye_p)
    return S.reshape(K * P, N, K, *pos)


def ce_sampled_factors(
    probs: Tensor, weight: Tensor | float, uniform: Tensor
) -> Tensor:
    r"""Monte-Carlo factors ``√(w/M) (e_ŷ − p)``, ``ŷ ~ Cat(p)`` per position: ``[M, N, K, *pos]``.

    Args:
        probs: ``[N, K, *pos]``.
        weight: ``[N, *pos]`` or a number.
        uniform: ``U(0, 1)`` draws ``[M, N, *pos]`` (inverse CDF).
    """
    M, K = uniform.shape[0], probs.shape[1]
    # inverse CDF: ŷ = #{k : cdf_k < u}, clamped against round-off in cdf_K ≈ 1
    cdf = probs.cumsum(dim=1)
    drawn = (cdf.unsqueeze(0) < uniform.unsqueeze(2)).sum(dim=2).clamp(max=K - 1)
    onehot = nn.functional.one_hot(drawn, K).movedim(-1, 2).to(probs.dtype)
    S = onehot - probs.unsqueeze(0)  # [M, N, K, *pos]
    if isinstance(weight, Tensor):  # [N, *pos] -> [1, N, 1, *pos]
        return S * (weight / M).sqrt().unsqueeze(1).unsqueeze(0)
    return S * math.sqrt(weight / M)


def position_factors(outputs: Tensor, weights: Tensor) -> Tensor:
    """:func:`ce_factors` for classes last: ``[V·P, N, *pos, V]``."""
    probs = outputs.detach().softmax(-1).movedim(-1, 1)  # [N, V, *pos]
    return ce_factors(probs, weights).movedim(2, -1)


def sampled_position_factors(
    outputs: Tensor, weights: Tensor, uniform: Tensor
) -> Tensor:
    """:func:`ce_sampled_factors` for classes last: ``[M, N, *pos, V]``."""
    probs = outputs.detach().softmax(-1).movedim(-1, 1)
    return ce_sampled_factors(probs, weights, uniform).movedim(2, -1)


__all__ = [
    "ce_factors",
    "ce_sampled_factors",
    "position_ce_weights",
    "position_factors",
    "sampled_position_factors",
]
