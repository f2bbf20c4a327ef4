r"""Symmetric square roots of the loss Hessian with respect to the model outputs.

For a loss with the (SIMD + reduction) structure

.. math::
    L(F) = ρ \sum_{n=1}^N ℓ(F_n, y_n),

the Hessian ``∇²_F L`` is block diagonal over samples. This module returns factors
``S`` with ``C`` columns per sample such that

.. math::
    ∇²_{F_n} L = ρ ∇²_{F_n} ℓ_n = \sum_{c=1}^C s_{nc} s_{nc}^⊤ .

The reduction factor ``ρ`` is folded into ``S`` (a factor ``√ρ``), exactly as PyTorch
defines it:

=====================  ======================================  =========  ======================
loss                   per-sample output ``F_n``               ``C``      ``ρ`` for ``'mean'``
=====================  ======================================  =========  ======================
``CrossEntropyLoss``   ``[K]`` or ``[K, d_1, …]`` (``P = Πd``)  ``K·P``    ``1 / (N·P)``
``MSELoss``            any ``[*out]``                          ``Π out``  ``1 / (N·Π out)``
``BCEWithLogitsLoss``  any ``[*out]``                          ``Π out``  ``1 / (N·Π out)``
=====================  ======================================  =========  ======================

``ρ = 1`` for ``'sum'``. The closed forms are

* cross-entropy, per position: ``∇²ℓ = w (diag p − p pᵀ)`` with ``p = softmax(F_n)`` and
  ``w = Σ_k y_k`` (``w = 1`` for class-index targets); square root
  ``√w (diag √p − p √pᵀ)``, exact because ``Σ_k p_k = 1``;
* squared error: ``∇²ℓ = 2 I``, square root ``√2 I``;
* binary cross-entropy with logits: ``∇²ℓ = diag σ(F)(1 − σ(F))``.

Any other loss ``loss(outputs, targets) -> scalar`` with this structure (``HuberLoss``,
``SmoothL1Loss``, ``GaussianNLLLoss`` with targets ``(target, var)``,
``PoissonNLLLoss``, ``KLDivLoss(reduction='batchmean')``, ``CrossEntropyLoss`` with
``label_smoothing``, a plain function, …) is wrapped by :func:`resolve_loss` into an
:class:`~lowrank_ggn.core.losses.autodiff.AutodiffLoss`: its structure is checked
numerically, and its factors are the eigendecomposition square roots of the per-sample
Hessians from automatic differentiation, with ``C`` their largest rank
(:mod:`lowrank_ggn.core.loss_hessians`). The closed forms above are the fast paths;
a loss found to be cross-entropy over positions with classes last (language models:
``F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1))``, shifted labels,
``ignore_index``) gets the cross-entropy closed form per position
(:mod:`lowrank_ggn.core.loss_positions`), never a ``[T·V, T·V]`` Hessian.

Each closed form is one class of :mod:`lowrank_ggn.core.losses` (targets check,
``ρ``, ``C``, factors, sampled factors), found by its registry; this module
dispatches to it. The targets are checked by :mod:`lowrank_ggn.core.loss_targets`; Monte-Carlo factors
with ``M`` sampled columns per sample are in :mod:`lowrank_ggn.core.loss_sampling`.

Reference: Dangel, Tatzel & Hennig, *ViViT: Curvature access through the generalized
Gauss-Newton's low-rank structure*, TMLR 2022, https://arxiv.org/abs/2106.02624.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lowrank_ggn.core.loss_hessians import autodiff_hessian_factors
from lowrank_ggn.core.loss_positions import position_factors
from lowrank_ggn.core.loss_targets import check_targets
from lowrank_ggn.core.losses.autodiff import (
    MODULE_REDUCTIONS,
    AutodiffLoss,
    sample_weight_of,
)
from lowrank_ggn.core.losses.registry import closed_form, resolve_loss


def num_factor_columns(loss_func: nn.Module, output_shape: torch.Size) -> int:
    """``C``, the number of factor columns per sample for outputs ``[N, *out]``.

    Exact for the closed forms (``O = Π out``); for an
    :class:`~lowrank_ggn.core.losses.autodiff.AutodiffLoss` an upper bound, since its
    ``C`` is the largest rank of the per-sample Hessians, known only once they are
    factorised (memory checks stay conservative).
    """
    form = closed_form(loss_func)
    return (
        math.prod(output_shape[1:]) if form is None else form.num_columns(output_shape)
    )


def reduction_factor(loss_func: nn.Module, outputs: Tensor) -> float:
    """``ρ`` of the closed forms' per-entry terms (CE: per position), else of ``ℓ_n``.

    For :class:`~lowrank_ggn.core.losses.autodiff.AutodiffLoss`, ``ρ`` multiplies the
    per-sample losses ``ℓ_n`` (as in :func:`sample_weight`).
    """
    if isinstance(loss_func, AutodiffLoss):
        return sample_weight_of(loss_func.reduction, outputs.shape[0])
    return closed_form(loss_func).rho(loss_func, outputs)


def sample_weight(loss_func: nn.Module, batch_size: int) -> float:
    r"""``ρ`` in ``L = ρ Σ_n ℓ_n`` for per-sample quantities: ``1/N`` or 1.

    The per-sample convention of :mod:`lowrank_ggn.diagnostics`: with
    ``reduction='mean'`` the per-sample losses ``ℓ_n`` are reduced over their own
    outputs (or positions) as the loss reduces them, so that ``L = (1/N) Σ_n ℓ_n``
    and the mean of the per-sample gradients is the batch gradient (BackPACK's and
    ViViT's individual gradients); with ``'sum'``, ``L = Σ_n ℓ_n``.

    ``loss_func`` is a resolved loss (:func:`resolve_loss`, after
    :func:`~lowrank_ggn.core.loss_targets.check_targets` on a batch): a plain
    function has no ``reduction``.
    """
    reduction = getattr(loss_func, "reduction", None)
    if reduction is None:
        raise TypeError(
            f"sample_weight needs a loss with a reduction; got {type(loss_func).__name__}. "
            "Resolve it first: loss_func = resolve_loss(loss_func), then "
            "check_targets(loss_func, outputs, targets)."
        )
    return sample_weight_of(MODULE_REDUCTIONS.get(reduction, reduction), batch_size)


def loss_hessian_factors(
    loss_func: object,
    outputs: Tensor,
    targets: object,
    memory_budget: float | None = None,
) -> Tensor:
    r"""Factors ``S`` with ``∇²_F L = Σ_c S[c] ⊗ S[c]`` per sample, reduction included.

    Closed forms for ``CrossEntropyLoss``, ``MSELoss`` and ``BCEWithLogitsLoss``
    (module docstring); for any other loss, the eigendecomposition square roots of
    the per-sample Hessians from automatic differentiation
    (:mod:`lowrank_ggn.core.loss_hessians`), after the numerical structure check
    (:mod:`lowrank_ggn.core.losses.autodiff`).

    Args:
        loss_func: A loss ``loss_func(outputs, targets) -> scalar`` with the
            per-sample-plus-reduction structure (see :func:`resolve_loss`).
        outputs: Model outputs ``[N, *out]``; only their values are used.
        targets: Targets, checked by
            :func:`~lowrank_ggn.core.loss_targets.check_targets` (a tuple is passed
            as ``loss_func(outputs, *targets)``).
        memory_budget: Bytes the autodiff path's per-sample Hessians ``[N, O, O]``
            may take (:mod:`lowrank_ggn.core.budget`); ``None``: environment or
            default.

    Returns:
        ``S`` of shape ``[C, N, *out]``. For every sample ``n``,
        ``Σ_c S[c, n] S[c, n]ᵀ = ∇²_{F_n} L`` (flattened over ``*out``), and
        ``S[c, m] = 0`` never couples samples: the Hessian is block diagonal. For
        autodiff losses ``C`` is the largest per-sample rank (at most ``Π out``).

    Raises:
        ValueError: For an autodiff loss that couples samples or whose per-sample
            Hessian is not positive semi-definite.

    Example:
        >>> import torch
        >>> out = torch.randn(4, 3, dtype=torch.float64)
        >>> S = loss_hessian_factors(torch.nn.MSELoss(reduction="sum"), out, out)
        >>> assert torch.allclose(torch.einsum("cnk,cnl->nkl", S, S)[0], 2 * torch.eye(3, dtype=out.dtype))

    """
    loss_func = resolve_loss(loss_func)
    check_targets(loss_func, outputs, targets)
    return hessian_factors(loss_func, outputs, targets, memory_budget)


def hessian_factors(
    loss_func: nn.Module,
    outputs: Tensor,
    targets: object,
    memory_budget: float | None = None,
) -> Tensor:
    """:func:`loss_hessian_factors` of a resolved loss whose targets were checked.

    The linearisation checks each batch's targets once, before its path check, and
    calls this.
    """
    if isinstance(loss_func, AutodiffLoss):
        if loss_func.positions is not None:  # cross-entropy over positions
            return position_factors(outputs, loss_func.positions)
        return autodiff_hessian_factors(loss_func, outputs, targets, memory_budget)
    return closed_form(loss_func).factors(loss_func, outputs.detach(), targets)
