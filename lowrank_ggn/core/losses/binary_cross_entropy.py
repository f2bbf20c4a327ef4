r"""``BCEWithLogitsLoss``: ``∇²ℓ = diag σ(F)(1 − σ(F))``.

Sampled with ``ŷ ~ Bernoulli(σ(F))`` per entry: ``s̃ = √(ρ / M) (ŷ − σ)``, since
``E[(ŷ − σ)²] = σ(1 − σ)``.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from lowrank_ggn.core.losses.base import ClosedFormLoss


class BinaryCrossEntropyWithLogits(ClosedFormLoss):
    """``BCEWithLogitsLoss``: ``S = diag √(ρ σ(F) σ(−F))`` per sample."""

    module = nn.BCEWithLogitsLoss

    def diagonal(self, rho: float, F: Tensor) -> Tensor:
        """``√(ρ σ(F) σ(−F))`` per entry."""
        # σ(x)(1 − σ(x)) = σ(x) σ(−x), accurate for large |x|
        return (rho * F.sigmoid() * (-F).sigmoid()).sqrt()

    def sample(self, rho: float, F: Tensor, y: Tensor, u: Tensor) -> Tensor:
        """``√(ρ / M) (ŷ − σ)`` with ``ŷ = [u < σ] ~ Bernoulli(σ)``."""
        sigma = F.sigmoid()
        return ((u < sigma).to(F.dtype) - sigma) * math.sqrt(rho / u.shape[0])


__all__ = ["BinaryCrossEntropyWithLogits"]
