r"""Curvature sub-sampling: the GGN of a subset of the batch, forward pass on all of it.

For a subset ``S ⊂ {0, …, N−1}`` of the batch, the sub-sampled GGN is

.. math::
    G_S = κ · J_S^⊤ H_{SS} J_S, \qquad
    κ = \begin{cases} N / |S| & \text{reduction 'mean'} \\ 1 & \text{'sum'} \end{cases}

with ``J_S = ∂F_S / ∂θ`` the Jacobian of the outputs of the samples in ``S`` and
``H_SS`` the ``S × S`` block of ``H = ∇²_F L``, the Hessian of the *full* batch loss
(``H`` is block diagonal over samples, so ``H_SS`` holds the blocks of ``S``). For
``'mean'``, ``κ`` turns the batch average ``1/N Σ_{n∈S}`` into the subset average
``1/|S| Σ_{n∈S}``, so ``E_S[G_S] = G`` for a uniformly drawn subset of fixed size.
The factors are the exact (or Monte-Carlo) ones of the samples in ``S``, times
``√κ``; the Gram matrix is ``|S|·C × |S|·C``.

**Cost.** One forward pass of the whole batch; ``V`` has ``|S|·C`` instead of
``N·C`` columns, so the Gram costs ``|S|/N`` of the backward passes and
``(|S|/N)²`` of the memory of the exact one.

**BatchNorm in train mode.** The forward pass always runs on the whole batch, so
batch statistics come from all ``N`` samples, exactly as in training. ``G_S`` is
then the curvature of the loss terms of the samples in ``S`` only, but each of their
outputs ``F_n`` still depends on all ``N`` inputs (through the batch mean and
variance), and ``J_S`` is differentiated through those statistics: ``G_S`` is *not*
the GGN of a forward pass on the sub-batch ``X_S`` alone (that one would have other
statistics and other Jacobians). Reference:
https://arxiv.org/abs/2106.02624 (ViViT, Section 3, curvature sub-sampling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def check_subsampling(
    indices: Sequence[int] | Tensor, batch_size: int, device: torch.device
) -> Tensor:
    """Validate curvature sub-sampling indices and return them as a long tensor.

    Args:
        indices: Batch positions ``S`` (list, tuple, range or 1-d integer tensor).
        batch_size: ``N``.
        device: Device of the returned index tensor.

    Returns:
        ``[|S|]`` long tensor, in the given order (it defines the Gram row order).

    Raises:
        TypeError: If ``indices`` are not integers.
        ValueError: If they are empty, not 1-d, out of ``[0, N)`` or repeated.

    """
    if isinstance(indices, Tensor):
        if indices.dtype == torch.bool or indices.is_floating_point():
            raise TypeError(
                f"subsampling must hold integer batch positions; got a tensor of "
                f"dtype {indices.dtype}. Use e.g. mask.nonzero().flatten()."
            )
        if indices.dim() != 1:
            raise ValueError(
                f"subsampling must be 1-d; got shape {tuple(indices.shape)}."
            )
        values = [int(i) for i in indices.tolist()]
    else:
        try:
            items = list(indices)
        except TypeError:
            raise TypeError(
                "subsampling must be a sequence of batch positions (list, range, or "
                f"1-d integer tensor); got {type(indices).__name__}."
            ) from None
        for i in items:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(
                    f"subsampling must hold ints; got {i!r} of type {type(i).__name__}."
                )
        values = items
    if not values:
        raise ValueError(
            "subsampling is empty; pass at least one batch position, or None."
        )
    bad = [i for i in values if not 0 <= i < batch_size]
    if bad:
        raise ValueError(
            f"subsampling positions must lie in [0, {batch_size}) for a batch of "
            f"{batch_size}; got {bad[:5]}."
        )
    if len(set(values)) != len(values):
        raise ValueError(
            "subsampling repeats a batch position; list each sample at most once."
        )
    return torch.tensor(values, dtype=torch.long, device=device)


def subsampling_scale(
    loss_func: nn.Module, batch_size: int, num_selected: int
) -> float:
    """``κ = N/|S|`` for ``'mean'`` and ``1`` for ``'sum'`` (see module docstring)."""
    return batch_size / num_selected if loss_func.reduction == "mean" else 1.0


def subsample_factors(loss_func: nn.Module, factors: Tensor, index: Tensor) -> Tensor:
    """``√κ · S[:, index]``: factor columns of the selected samples, ``[C, |S|, *out]``.

    Args:
        loss_func: The loss (its reduction decides ``κ``).
        factors: ``[C, N, *out]``, exact or Monte-Carlo, reduction included.
        index: ``[|S|]`` checked positions (:func:`check_subsampling`).

    """
    kappa = subsampling_scale(loss_func, factors.shape[1], index.numel())
    return factors[:, index] * math.sqrt(kappa)
