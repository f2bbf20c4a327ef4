r"""Monte-Carlo square roots of the loss Hessian: ``M`` sampled columns per sample.

:func:`sampled_loss_hessian_factors` returns ``S̃`` ``[M, N, *out]`` with

.. math::
    \mathbb{E}\Big[\sum_{m=1}^M s̃_{nm} s̃_{nm}^⊤\Big] = ∇²_{F_n} L

for every sample ``n``, reduction factor ``ρ`` (and cross-entropy target weight
``w``) included as in :func:`~lowrank_ggn.core.loss_factors.loss_hessian_factors`.
The sampling rules:

* cross-entropy: ``s̃_nm = √(ρ w / M) (onehot(ŷ_m) − p)`` with categorical draws
  ``ŷ_m ~ Cat(p)``, ``p = softmax(F_n)``, independent at every spatial position,
  since ``E[(e_ŷ − p)(e_ŷ − p)ᵀ] = diag p − p pᵀ``;
* squared error: ``s̃_nm = √(2ρ / M) z_m`` with Rademacher ``z_m ∈ {±1}^{out}``,
  since ``E[z zᵀ] = I``;
* binary cross-entropy with logits: ``s̃_nm = √(ρ / M) (ŷ_m − σ)`` with
  ``ŷ_m ~ Bernoulli(σ(F_n))`` per entry, since ``E[(ŷ − σ)²] = σ(1 − σ)``;
* any other (autodiff) loss: Gaussian sketches ``s̃_nm = S_n z_nm / √M`` of the exact
  eigendecomposition factors ``S_n`` ``[O, C]`` with ``z_nm ~ N(0, I_C)``, since
  ``E[S z zᵀ Sᵀ] = S Sᵀ`` (:func:`~lowrank_ggn.core.loss_hessians.gaussian_sketch`).

Each estimate is unbiased per sample, so the Monte-Carlo GGN ``J_θᵀ S̃ S̃ᵀ J_θ`` is an
unbiased estimate of the exact GGN: ``J`` is exact, only the loss Hessian is sampled.
The Gram matrix shrinks from ``N·C`` to ``N·M`` columns.

Reference: Dangel, Tatzel & Hennig, *ViViT: Curvature access through the generalized
Gauss-Newton's low-rank structure*, TMLR 2022, https://arxiv.org/abs/2106.02624.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lowrank_ggn.core.loss_hessians import autodiff_hessian_factors, gaussian_sketch
from lowrank_ggn.core.loss_positions import (
    sampled_position_factors,
)
from lowrank_ggn.core.loss_targets import check_targets
from lowrank_ggn.core.losses.autodiff import AutodiffLoss
from lowrank_ggn.core.losses.base import uniform
from lowrank_ggn.core.losses.registry import closed_form, resolve_loss

if TYPE_CHECKING:
    from lowrank_ggn.core.options import GGNOptions


def check_generator(generator: object) -> None:
    """``generator`` must be a ``torch.Generator`` or ``None``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None; got {type(generator).__name__}."
            " Pass e.g. torch.Generator().manual_seed(0)."
        )


def check_mc_samples(mc_samples: int | None, generator: object = None) -> None:
    """Raise unless ``mc_samples`` is ``None`` or a positive int and ``generator`` fits.

    Raises:
        ValueError: For ``mc_samples`` that is not a positive int.
        TypeError: For a ``generator`` that is not a ``torch.Generator``.

    """
    if mc_samples is not None and (
        isinstance(mc_samples, bool)
        or not isinstance(mc_samples, int)
        or mc_samples < 1
    ):
        raise ValueError(
            f"mc_samples must be a positive int (sampled factor columns per sample) or "
            f"None for the exact factors; got {mc_samples!r}."
        )
    check_generator(generator)
    if generator is not None and mc_samples is None:
        raise ValueError(
            "generator is only used with mc_samples=M (Monte-Carlo factors); pass "
            "mc_samples or drop generator."
        )


def sampled_loss_hessian_factors(
    loss_func: object,
    outputs: Tensor,
    targets: object,
    mc_samples: int,
    generator: torch.Generator | None = None,
    memory_budget: float | None = None,
) -> Tensor:
    r"""Monte-Carlo factors ``S̃`` with ``E[Σ_m S̃[m] ⊗ S̃[m]] = ∇²_F L`` per sample.

    Each sample gets ``M = mc_samples`` columns instead of the ``C`` exact ones
    (reduction factor ``ρ`` and target weight ``w`` included as in
    :func:`~lowrank_ggn.core.loss_factors.loss_hessian_factors`):

    * cross-entropy: ``s̃_nm = √(ρ w / M) (onehot(ŷ_m) − p)`` with ``ŷ_m ~ Cat(p)``
      drawn independently at every spatial position, since
      ``E[(e_ŷ − p)(e_ŷ − p)ᵀ] = diag p − p pᵀ`` and draws at different positions are
      independent with mean zero;
    * squared error: ``s̃_nm = √(2ρ / M) z_m`` with Rademacher ``z_m ∈ {±1}^{out}``,
      since ``E[z zᵀ] = I``;
    * binary cross-entropy: ``s̃_nm = √(ρ / M) (ŷ_m − σ)`` with
      ``ŷ_m ~ Bernoulli(σ(F_n))`` per entry, since ``E[(ŷ − σ)²] = σ(1 − σ)``;
    * cross-entropy over positions, classes last (a recognised autodiff loss,
      :mod:`lowrank_ggn.core.loss_positions`): as cross-entropy, with the position
      weights ``w_{nt}`` in place of ``ρ w``;
    * any other (autodiff) loss: Gaussian sketches ``s̃_nm = S_n z_nm / √M`` of the
      exact factors ``S_n`` ``[O, C]``
      (:func:`~lowrank_ggn.core.loss_factors.loss_hessian_factors`) with
      ``z_nm ~ N(0, I_C)``, since ``E[S z zᵀ Sᵀ] = S Sᵀ``; each ``s̃_nm`` is
      ``N(0, ∇²_{F_n} L / M)`` whatever eigenbasis ``S_n`` holds. The exact
      per-sample Hessians are still formed: the saving is in the Gram matrix
      (``N·M`` instead of ``N·C`` columns).

    The estimate ``Σ_m s̃_nm s̃_nmᵀ`` is unbiased for every sample, so the MC GGN
    ``J_θᵀ S̃ S̃ᵀ J_θ`` is an unbiased estimate of the exact GGN (also under train-mode
    BatchNorm: ``J`` is exact, only ``H`` is sampled).

    Random numbers: ``U(0, 1)`` draws (closed forms) or ``N(0, 1)`` draws ``[M, N, C]``
    (autodiff losses) from ``generator`` (on the generator's device, in the outputs'
    dtype; then moved to the outputs' device), or from the default generator of the
    outputs' device when ``generator`` is ``None``. The same seed gives the same
    factors.

    Args:
        loss_func: A loss, as for
            :func:`~lowrank_ggn.core.loss_factors.loss_hessian_factors`.
        outputs: Model outputs ``[N, *out]``; only their values are used.
        targets: Targets, checked by :func:`check_targets`.
        mc_samples: ``M ≥ 1``, sampled columns per sample.
        generator: Source of randomness (see above).
        memory_budget: As for
            :func:`~lowrank_ggn.core.loss_factors.loss_hessian_factors`.

    Returns:
        ``S̃`` of shape ``[M, N, *out]``.

    Example:
        >>> import torch
        >>> out = torch.randn(2, 3, dtype=torch.float64)
        >>> loss = torch.nn.CrossEntropyLoss(reduction="sum")
        >>> S = sampled_loss_hessian_factors(loss, out, torch.tensor([0, 2]), 4,
        ...                                  torch.Generator().manual_seed(0))
        >>> assert S.shape == (4, 2, 3) and torch.allclose(S.sum(-1), torch.zeros(4, 2, dtype=S.dtype))

    """
    loss_func = resolve_loss(loss_func)
    check_targets(loss_func, outputs, targets)
    check_mc_samples(mc_samples, generator)
    return _sampled(loss_func, outputs, targets, mc_samples, generator, memory_budget)


def sampled_factors(
    loss_func: nn.Module, outputs: Tensor, targets: object, options: GGNOptions
) -> Tensor:
    """:func:`sampled_loss_hessian_factors` of a resolved loss and checked targets.

    ``M``, the generator and the memory budget come from ``options``; the
    linearisation checks each batch's targets once and calls this.
    """
    return _sampled(
        loss_func,
        outputs,
        targets,
        options.mc_samples,
        options.generator,
        options.memory_budget,
    )


def _sampled(
    loss_func: nn.Module,
    outputs: Tensor,
    targets: object,
    mc_samples: int,
    generator: torch.Generator | None,
    memory_budget: float | None,
) -> Tensor:
    """The draw (arguments as for :func:`sampled_loss_hessian_factors`)."""
    if isinstance(loss_func, AutodiffLoss):
        if loss_func.positions is not None:  # cross-entropy over positions
            u = uniform((mc_samples, *outputs.shape[:-1]), outputs, generator)
            return sampled_position_factors(outputs, loss_func.positions, u)
        exact = autodiff_hessian_factors(loss_func, outputs, targets, memory_budget)
        return gaussian_sketch(exact, mc_samples, generator)
    form = closed_form(loss_func)
    return form.sampled_factors(
        loss_func, outputs.detach(), targets, mc_samples, generator
    )
