r"""``CrossEntropyLoss``, per position: ``∇²ℓ = w (diag p − p pᵀ)``, ``p = softmax(F_n)``.

``w = Σ_k y_k`` for probability targets (``w = 1`` for class indices); the square
root ``√w (diag √p − p √pᵀ)`` is exact because ``Σ_k p_k = 1``
(:func:`lowrank_ggn.core.loss_positions.ce_factors`). Outputs ``[N, K, *pos]``
(``P = Π pos``) have ``C = K·P`` columns and ``ρ = 1/(N·P)`` for ``'mean'``. Sampled:
``s̃ = √(ρ w / M) (onehot(ŷ) − p)`` with ``ŷ ~ Cat(p)`` per position, since
``E[(e_ŷ − p)(e_ŷ − p)ᵀ] = diag p − p pᵀ``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lowrank_ggn.core.loss_positions import ce_factors, ce_sampled_factors
from lowrank_ggn.core.losses.base import ClosedFormLoss


def check_class_targets(
    name: str, ignore_index: int, outputs: Tensor, targets: Tensor
) -> None:
    """Cross-entropy targets: class indices ``[N, *pos]`` or probabilities ``[N, K, *pos]``."""
    if outputs.dim() < 2:
        raise ValueError(
            f"{name} needs outputs [N, K, ...] with a class dimension; got model "
            f"outputs of shape {tuple(outputs.shape)}."
        )
    K = outputs.shape[1]
    if targets.is_floating_point():
        if targets.shape != outputs.shape:
            raise ValueError(
                f"{name} with probability targets needs targets of the output "
                f"shape {tuple(outputs.shape)}; got {tuple(targets.shape)}."
            )
        if (targets < 0).any():
            raise ValueError(
                f"{name} probability targets must be non-negative, else the loss "
                "Hessian is not positive semi-definite; got a negative entry."
            )
        return
    if targets.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16):
        raise TypeError(
            f"{name} targets must be class indices (integer dtype) or class "
            f"probabilities (floating dtype); got dtype {targets.dtype}."
        )
    expected = outputs.shape[:1] + outputs.shape[2:]
    if targets.shape != expected:
        raise ValueError(
            f"{name} class-index targets must have shape {tuple(expected)} for "
            f"outputs {tuple(outputs.shape)}; got {tuple(targets.shape)}."
        )
    if (targets == ignore_index).any():
        raise NotImplementedError(
            f"targets contain ignore_index={ignore_index}; ignored "
            "targets are not supported. Drop those samples from the batch."
        )
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= K:
        raise ValueError(
            f"targets must lie in [0, {K}) for {name} with {K} classes; got "
            f"values in [{lo}, {hi}]."
        )


class CrossEntropy(ClosedFormLoss):
    """``CrossEntropyLoss`` (see the module docstring)."""

    module = nn.CrossEntropyLoss

    def check_target_values(self, loss: nn.Module, F: Tensor, y: Tensor) -> None:
        """Class indices ``[N, *pos]`` or probabilities ``[N, K, *pos]``."""
        check_class_targets(type(loss).__name__, loss.ignore_index, F, y)

    def rho(self, loss_func: nn.Module, outputs: Tensor) -> float:
        """1 for ``'sum'``, ``1/(N·P)`` for ``'mean'``: per position."""
        if loss_func.reduction == "sum":
            return 1.0
        return 1.0 / (outputs.shape[0] * math.prod(outputs.shape[2:]))

    def roots(self, rho: float, F: Tensor, y: Tensor) -> Tensor:
        """``√w (diag √p − p √pᵀ)`` per position, ``[K·P, N, K, *pos]``."""
        return ce_factors(F.softmax(dim=1), _weight(rho, y))

    def draw_shape(self, F: Tensor, M: int) -> tuple[int, ...]:
        """One draw per sample and position: ``[M, N, *pos]``."""
        return (M, *F.shape[:1], *F.shape[2:])

    def sample(self, rho: float, F: Tensor, y: Tensor, u: Tensor) -> Tensor:
        """``√(ρ w / M) (e_ŷ − p)``, ``ŷ ~ Cat(p)`` per position, ``[M, N, K, *pos]``."""
        return ce_sampled_factors(F.softmax(dim=1), _weight(rho, y), u)


def _weight(rho: float, targets: Tensor) -> Tensor | float:
    """``ρ w``: ``w = Σ_k y_k`` for probability targets, 1 for class indices."""
    return rho * (targets.sum(1) if targets.is_floating_point() else 1.0)


__all__ = ["CrossEntropy", "check_class_targets"]
