r"""What a closed-form loss provides, and the target checks the losses share.

A :class:`ClosedFormLoss` owns everything the toolkit needs of one loss: the check
of its targets, its reduction factor ``ρ``, the number ``C`` of factor columns per
sample, the exact factors ``S`` with ``Σ_c S[c, n] S[c, n]ᵀ = ∇²_{F_n} L`` and the
Monte-Carlo factors ``S̃`` with ``E[Σ_m S̃[m, n] S̃[m, n]ᵀ] = ∇²_{F_n} L``
(:mod:`lowrank_ggn.core.loss_factors`, :mod:`lowrank_ggn.core.loss_sampling`).
Adding a closed-form loss is adding one subclass and one registry entry
(:mod:`lowrank_ggn.core.losses.registry`), as BackPACK keeps each loss's exact and
sampled square roots on that loss's own class.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def check_target_tensor(
    target: Tensor, outputs: Tensor, label: str = "targets"
) -> None:
    """Device and finiteness of one target tensor."""
    if target.device != outputs.device:
        raise ValueError(
            f"{label} are on {target.device} but the outputs on {outputs.device}; "
            f"move them with {label}.to({str(outputs.device)!r})."
        )
    if target.is_floating_point() and not torch.isfinite(target).all():
        raise ValueError(
            f"{label} contain NaN or Inf; clean the batch first (torch.isfinite)."
        )


def check_batch_size(targets: Tensor, outputs: Tensor) -> None:
    """One target per sample: the same dim 0 as the outputs."""
    if targets.shape[:1] != outputs.shape[:1]:
        raise ValueError(
            f"targets have batch size {targets.shape[0] if targets.dim() else 'none'} "
            f"but the model outputs have batch size {outputs.shape[0]}; pass one "
            "target per input sample."
        )


def uniform(
    shape: tuple[int, ...], outputs: Tensor, generator: torch.Generator | None
) -> Tensor:
    """``U(0, 1)`` draws, made on the generator's device, returned on ``outputs``'."""
    device = outputs.device if generator is None else generator.device
    u = torch.rand(shape, generator=generator, dtype=outputs.dtype, device=device)
    return u.to(outputs.device)


class ClosedFormLoss:
    """One loss module type with closed-form factors (see the module docstring).

    The default methods are those of an element-wise loss (``MSELoss``,
    ``BCEWithLogitsLoss``): targets of the output shape, ``ρ = 1/(N·Π out)`` for
    ``'mean'``, ``C = Π out`` columns ``S[c, n] = d[n, c] e_c`` from the diagonal
    :meth:`hessian_roots` ``d``.
    """

    #: The ``torch.nn`` loss type this class computes factors for.
    module: type[nn.Module] = nn.Module

    def check_targets(
        self, loss_func: nn.Module, outputs: Tensor, targets: object
    ) -> None:
        """Raise unless ``targets`` is a tensor that fits ``outputs`` for this loss."""
        if not isinstance(targets, Tensor):
            raise TypeError(
                f"targets must be a torch.Tensor for {type(loss_func).__name__}; got "
                f"{type(targets).__name__}"
            )
        check_target_tensor(targets, outputs)
        check_batch_size(targets, outputs)
        self.check_target_values(loss_func, outputs, targets)

    def check_target_values(self, loss: nn.Module, F: Tensor, y: Tensor) -> None:
        """Shape and dtype of the targets ``y`` (element-wise: those of ``F``)."""
        name = type(loss).__name__
        if y.shape != F.shape:
            raise ValueError(
                f"{name} needs targets of the output shape {tuple(F.shape)}; got "
                f"{tuple(y.shape)}. (Broadcasting is not supported.)"
            )
        if not y.is_floating_point():
            raise TypeError(f"{name} targets must be floating point; got {y.dtype}.")

    def rho(self, loss_func: nn.Module, outputs: Tensor) -> float:
        """``ρ`` of the per-entry terms: 1 for ``'sum'``, ``1/(N·Π out)`` for ``'mean'``."""
        return 1.0 if loss_func.reduction == "sum" else 1.0 / outputs.numel()

    def num_columns(self, output_shape: torch.Size) -> int:
        """``C`` for outputs ``[N, *out]``: ``Π out``."""
        return math.prod(output_shape[1:])

    def factors(self, loss_func: nn.Module, outputs: Tensor, targets: Tensor) -> Tensor:
        """``S`` ``[C, N, *out]`` with ``ρ`` included: :meth:`roots` at this ``ρ``."""
        return self.roots(self.rho(loss_func, outputs), outputs, targets)

    def roots(self, rho: float, F: Tensor, y: Tensor) -> Tensor:
        """``S`` of outputs ``F``; element-wise: ``S[c, n] = d[n, c] e_c`` (:meth:`diagonal`)."""
        N, out_shape = F.shape[0], F.shape[1:]
        C = math.prod(out_shape)
        diag = self.diagonal(rho, F).reshape(N, C)
        eye = torch.eye(C, dtype=F.dtype, device=F.device)
        # S[c, n, :] = diag[n, c] e_c
        S = eye.unsqueeze(1) * diag.T.unsqueeze(-1)  # [C, N, C]
        return S.reshape(C, N, *out_shape)

    def diagonal(self, rho: float, F: Tensor) -> Tensor:
        """Element-wise losses: ``√(ρ ∂²ℓ/∂F²)`` per entry, shaped like ``F``."""
        raise NotImplementedError

    def sampled_factors(
        self,
        loss_func: nn.Module,
        outputs: Tensor,
        targets: Tensor,
        mc_samples: int,
        generator: torch.Generator | None,
    ) -> Tensor:
        """``S̃`` ``[M, N, *out]`` with ``E[Σ_m S̃[m, n] S̃[m, n]ᵀ] = ∇²_{F_n} L``.

        Uniform draws of :meth:`draw_shape` from ``generator``, turned into columns
        by :meth:`sample`.
        """
        u = uniform(self.draw_shape(outputs, mc_samples), outputs, generator)
        return self.sample(self.rho(loss_func, outputs), outputs, targets, u)

    def draw_shape(self, F: Tensor, M: int) -> tuple[int, ...]:
        """The uniform draws :meth:`sample` needs: ``[M, N, *out]``."""
        return (M, *F.shape)

    def sample(self, rho: float, F: Tensor, y: Tensor, u: Tensor) -> Tensor:
        """Monte-Carlo columns from uniform draws ``u`` (``M = u.shape[0]``)."""
        raise NotImplementedError


__all__ = [
    "ClosedFormLoss",
    "check_batch_size",
    "check_target_tensor",
    "uniform",
]
