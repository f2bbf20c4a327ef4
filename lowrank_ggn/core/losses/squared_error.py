r"""``MSELoss``: ``∇²ℓ = 2 I``, square root ``√2 I``.

Sampled with Rademacher ``z ∈ {±1}^{out}``: ``s̃ = √(2ρ / M) z``, since
``E[z zᵀ] = I``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lowrank_ggn.core.losses.base import ClosedFormLoss


class SquaredError(ClosedFormLoss):
    """``MSELoss``: ``S = √(2ρ) I`` per sample."""

    module = nn.MSELoss

    def diagonal(self, rho: float, F: Tensor) -> Tensor:
        """``√(2ρ)`` everywhere."""
        return torch.full_like(F, math.sqrt(2.0 * rho))

    def sample(self, rho: float, F: Tensor, y: Tensor, u: Tensor) -> Tensor:
        """``√(2ρ / M) z`` with Rademacher ``z = ±1`` (``u < ½``)."""
        z = torch.where(u < 0.5, -1.0, 1.0).to(F.dtype)
        return z * math.sqrt(2.0 * rho / u.shape[0])


__all__ = ["SquaredError"]
