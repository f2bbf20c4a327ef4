r"""One damped Newton step in the top-k eigenspace: its math and its record.

Along the GGN's top eigenvectors ``e_k`` (eigenvalues ``λ_k``) with slopes
``γ_k = e_kᵀ g`` and dampings ``δ_k``, the step is ``Δθ = −lr Σ_k γ_k / (λ_k + δ_k) e_k``
(:func:`newton_coefficients`; no step where ``δ_k = inf``). The per-sample
(per-component) curvatures that feed the damping policies
(:mod:`lowrank_ggn.optim.damping`) need no pass (:func:`gram_curvatures`):

.. math::
    λ_{nk} = \frac{‖V_n^⊤ e_k‖²}{ρ_S} = \frac{λ_k ‖u_k[n·C:(n+1)·C]‖²}{ρ_S},

because ``V_nᵀ e_k = V_nᵀ V u_k / √λ_k = (Vᵀ V u_k)_n / √λ_k = √λ_k u_k[n]`` for the
Gram eigenvector ``u_k`` (``[N_S·C]``, sample-major). ``V_n`` are the factor columns
of sample ``n``, so this is the per-sample (per-component) curvature of the factors in
use — exact ones, Monte-Carlo ones or a curvature sub-sample of ``N_S`` samples with
``ρ_S = 1/N_S`` (``'mean'``) — and ``ρ_S Σ_n λ_nk = λ_k`` holds exactly.
:class:`StepInfo` records what one :meth:`lowrank_ggn.optim.DampedNewton.step`
computed.

Reference: Dangel, Tatzel & Hennig, TMLR 2022, https://arxiv.org/abs/2106.02624.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lowrank_ggn.core.paths import EnginePath


@dataclass
class StepInfo:
    """What one :meth:`DampedNewton.step` computed (at the parameters before it).

    Attributes:
        loss: The batch loss ``L``.
        eigenvalues: ``[K]``, ``λ_k`` (``K ≤ top_k``: only resolved eigenvalues).
        eigenvectors: ``[K, D]``, ``e_k``, kept only with ``keep_eigenvectors=True``
            (else ``None``).
        slopes: ``[K]``, ``γ_k = e_kᵀ g``.
        gammas: ``[N, K]``, per-sample (per-component) slopes ``γ_nk``.
        lambdas: ``[N_S, K]``, per-sample (per-component) curvatures ``λ_nk``.
        damping: ``[K]``, ``δ_k`` (``inf``: no step along ``e_k``).
        coefficients: ``[K]``, Newton coefficients ``γ_k / (λ_k + δ_k)`` (0 where
            ``δ_k = inf``); the step along ``e_k`` is ``−lr`` times this.
        num_directions: Directions stepped along (finite ``δ_k``).
        step_norm: ``‖Δθ‖₂``.
        gradient_norm: ``‖g‖₂``.
        path: The engine's path (``per_sample`` or ``full_batch``, and why).
        engine_report: How the Gram matrix and eigenpairs were computed.
        forward_passes: Forward passes of the batch the step ran (full-batch
            equivalents; ``update_buffers`` adds one).
        sample_mixing: The forward pass mixes samples: ``gammas``/``lambdas`` are
            per-component quantities.
        gradient_source: ``'batch'`` (the batch loss's gradient, computed by the
            step) or ``'grad'`` (the parameters' ``.grad``, left by the caller).
    """

    loss: float
    eigenvalues: Tensor
    eigenvectors: Tensor | None
    slopes: Tensor
    gammas: Tensor
    lambdas: Tensor
    damping: Tensor
    coefficients: Tensor
    num_directions: int
    step_norm: float
    gradient_norm: float
    path: EnginePath
    engine_report: Any
    forward_passes: float
    sample_mixing: bool
    gradient_source: str = "batch"


def gram_curvatures(
    eigenvalues: Tensor, gram_eigenvectors: Tensor, num_samples: int, rho: float
) -> Tensor:
    r"""``λ_nk = λ_k ‖u_k[n·C:(n+1)·C]‖² / ρ_S`` ``[N_S, K]`` from Gram eigenpairs.

    Args:
        eigenvalues: ``[K]``.
        gram_eigenvectors: ``[N_S·C, K]``, sample-major.
        num_samples: ``N_S``.
        rho: ``ρ_S``.

    Example:
        >>> import torch
        >>> U = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64))[0]
        >>> lam = gram_curvatures(torch.tensor([2.0, 1.0]).double(), U, 3, 1 / 3)
        >>> assert torch.allclose(lam.sum(0) / 3, torch.tensor([2.0, 1.0]).double())
    """
    NC, K = gram_eigenvectors.shape
    U = gram_eigenvectors.reshape(num_samples, NC // num_samples, K).double()
    lambdas = eigenvalues.double() * U.square().sum(1) / rho
    return lambdas.to(eigenvalues.dtype)


def newton_coefficients(slopes: Tensor, eigenvalues: Tensor, damping: Tensor) -> Tensor:
    """``γ_k / (λ_k + δ_k)``, and 0 where ``δ_k = inf``."""
    finite = torch.isfinite(damping)
    denom = eigenvalues + torch.where(finite, damping, torch.zeros_like(damping))
    return torch.where(finite, slopes / denom, torch.zeros_like(slopes))


def check_damping_output(damping: Any, K: int, ref: Tensor) -> Tensor:
    """A damping policy's output as ``[K]`` dampings in ``[0, inf]``, or a clear error."""
    damping = torch.as_tensor(damping).to(dtype=ref.dtype, device=ref.device)
    if damping.shape != (K,):
        raise ValueError(
            f"the damping policy must return one damping per direction, shape ({K},); "
            f"got {tuple(damping.shape)}."
        )
    if torch.isnan(damping).any() or (damping < 0).any():
        raise ValueError(
            f"the damping policy returned NaN or negative dampings {damping.tolist()}; "
            "dampings must lie in [0, inf] (inf: no step along that direction)."
        )
    return damping


__all__ = ["StepInfo", "check_damping_output", "gram_curvatures", "newton_coefficients"]
