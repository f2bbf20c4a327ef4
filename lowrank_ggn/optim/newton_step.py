r"""One damped Newton step in the top-k eigenspace: its math and its record.

Along the GGN's top eigenvectors ``e_k`` (eigenvalues ``λ_k``) with slopes
``γ_k = e_kᵀ g`` and dampings ``δ_k``, the step is ``Δθ = −lr Σ_k γ_k / (λ_k + δ_k) e_k``
(:func:`newton_coefficients`; no step where ``δ_k = inf``). The per-sample
(per-component) curvatures and slopes that feed the damping policies
(:mod:`lowrank_ggn.optim.damping`) need no pass (:func:`gram_curvatures`,
:func:`factor_slopes`):

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

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lowrank_ggn.core.paths import EnginePath

#: Factor columns per sample up to which :func:`factor_slopes` solves for ``w_n``
#: (``N`` least-squares problems of size ``[O, C]``); beyond, ``e_k`` is pushed forward.
MAX_SLOPE_COLUMNS = 256


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
        gamma_route: How ``gammas`` were computed: ``'factors'`` (from the Gram
            eigenvectors, :func:`factor_slopes`, no pass) or ``'pushforward'``
            (``J e_k`` by double backward, where the factors do not span the output
            gradient: Monte-Carlo or autodiff factors, curvature sub-sampling).
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
    gamma_route: str = "factors"


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


def factor_slopes(
    factors: Tensor,
    output_gradient: Tensor,
    eigenvalues: Tensor,
    gram_eigenvectors: Tensor,
    rho: float,
) -> Tensor | None:
    r"""``γ_nk = e_kᵀ ∇_θ ℓ_n`` ``[N, K]`` from the Gram eigenpairs, or ``None``.

    Where sample ``n``'s output gradient lies in the span of its factor columns,
    ``∂L/∂F_n = S_n w_n`` (``S_n`` ``[O, C]``), the chain rule gives
    ``ρ ∇_θ ℓ_n = J_nᵀ S_n w_n = V_n w_n`` and, with ``V_nᵀ e_k = √λ_k u_k[n]``
    (as for :func:`gram_curvatures`),

    .. math::
        γ_{nk} = \frac{w_n^⊤ V_n^⊤ e_k}{ρ} = \frac{√λ_k\, w_n^⊤ u_k[n·C:(n+1)·C]}{ρ},

    no pass through the model. It holds for per-component quantities too (``J_n``
    the full-batch Jacobian of output ``n``). The exact factors of the closed-form
    losses span their gradients (cross-entropy: both sum to zero over the classes;
    square loss: ``S_n`` is a multiple of the identity); Monte-Carlo factors and
    autodiff factors may not, and then (least-squares residual above
    ``√eps · ‖∂L/∂F_n‖``, in the factors' dtype) this returns ``None`` and the
    caller pushes ``e_k`` forward instead.

    Args:
        factors: ``S``, ``[C, N, *out]`` (reduction factor included), all ``N``
            samples in batch order.
        output_gradient: ``∂L/∂F``, ``[N, *out]`` (reduction factor included).
        eigenvalues: ``[K]``, ``λ_k``.
        gram_eigenvectors: ``[N·C, K]``, sample-major.
        rho: ``ρ`` of ``L = ρ Σ_n ℓ_n``.

    Example:
        >>> import torch
        >>> S = torch.randn(2, 3, 2, dtype=torch.float64)  # C = 2, N = 3, O = 2
        >>> w = torch.randn(3, 2, dtype=torch.float64)
        >>> g = torch.einsum("cno,nc->no", S, w)  # in the span of the factors
        >>> U = torch.linalg.qr(torch.randn(6, 1, dtype=torch.float64))[0]
        >>> gam = factor_slopes(S, g, torch.ones(1).double(), U, 1.0)
        >>> assert torch.allclose(gam[:, 0], (w * U.reshape(3, 2)).sum(1))
    """
    C, N = factors.shape[:2]
    work = factors.numel() * C  # the least-squares solves' multiply-adds
    if C > MAX_SLOPE_COLUMNS or work > 2**31 or gram_eigenvectors.shape[0] != N * C:
        return None
    eps = torch.finfo(factors.dtype).eps
    S = factors.reshape(C, N, -1).permute(1, 2, 0).double()  # [N, O, C]
    g = output_gradient.reshape(N, -1, 1).double()  # [N, O, 1]
    rtol = max(S.shape[1], C) * eps  # singular values of S below it: rounding only
    w = torch.linalg.pinv(S, rtol=rtol) @ g  # [N, C, 1]
    residual = (S @ w - g).flatten(1).norm(dim=1)
    if (residual > math.sqrt(eps) * g.flatten(1).norm(dim=1)).any():
        return None
    K = eigenvalues.numel()
    U = gram_eigenvectors.double().reshape(N, C, K)
    gammas = (w * U).sum(1) * eigenvalues.double().clamp(min=0).sqrt() / rho
    return gammas.to(eigenvalues.dtype)


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


__all__ = [
    "StepInfo",
    "check_damping_output",
    "factor_slopes",
    "gram_curvatures",
    "newton_coefficients",
]
