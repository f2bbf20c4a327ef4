r"""Checks that targets fit the model outputs and the loss, before any factor is formed.

Every loss gets the outputs checked: a finite floating tensor ``[N, *out]`` with
``N ≥ 1``. Then, for the closed-form losses of :mod:`lowrank_ggn.core.loss_factors`:

* ``CrossEntropyLoss``: class indices ``[N, *pos]`` in ``[0, K)`` (integer dtype, no
  ``ignore_index``) or non-negative class probabilities of the output shape
  ``[N, K, *pos]``;
* ``MSELoss`` and ``BCEWithLogitsLoss``: floating targets of exactly the output
  shape (no broadcasting);

and, for every target tensor, its device (that of the outputs), its finiteness and
its batch size ``N``.

For every other loss, resolved into an
:class:`~lowrank_ggn.core.losses.autodiff.AutodiffLoss` (whose ``reduction`` this
fixes): the targets are a tensor with ``N`` rows, or a tuple passed as
``loss_func(outputs, *targets)`` with at least one per-sample entry; ``NLLLoss`` and
wrapped ``CrossEntropyLoss`` class indices are checked as above; and, unless
``structure=False``, the loss is checked numerically to be ``L = ρ Σ_n ℓ_n`` with a
Hessian that does not couple samples
(:func:`~lowrank_ggn.core.losses.autodiff.check_structure`).

Reference: Dangel, Tatzel & Hennig, *ViViT: Curvature access through the generalized
Gauss-Newton's low-rank structure*, TMLR 2022, https://arxiv.org/abs/2106.02624.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowrank_ggn.core.inputs import ModelInputs
from lowrank_ggn.core.losses.autodiff import AutodiffLoss, check_structure
from lowrank_ggn.core.losses.base import check_batch_size, check_target_tensor
from lowrank_ggn.core.losses.cross_entropy import check_class_targets
from lowrank_ggn.core.losses.registry import CLASS_LOSSES, closed_form, resolve_loss


def _check_outputs(outputs: Tensor) -> None:
    """``outputs`` are a finite floating tensor ``[N, *out]`` with ``N ≥ 1``."""
    if not isinstance(outputs, Tensor) or not outputs.is_floating_point():
        raise TypeError(
            "outputs must be a floating-point torch.Tensor [N, *out]; got "
            f"{getattr(outputs, 'dtype', type(outputs).__name__)}."
        )
    if outputs.dim() == 0 or outputs.shape[0] == 0:
        raise ValueError(
            f"outputs must hold at least one sample in dim 0; got shape "
            f"{tuple(outputs.shape)}."
        )
    if not torch.isfinite(outputs).all():
        raise ValueError("outputs contain NaN or Inf; the loss Hessian is undefined.")


def _check_autodiff_targets(
    loss_func: AutodiffLoss, outputs: Tensor, targets: object
) -> None:
    """A tensor ``[N, …]`` or a tuple with a per-sample entry; class checks for CE/NLL."""
    if isinstance(targets, tuple):
        for i, t in enumerate(targets):
            if isinstance(t, Tensor):
                check_target_tensor(t, outputs, f"targets[{i}]")
        ModelInputs(targets, outputs.shape[0], name="targets")  # one entry with N rows
        return
    if not isinstance(targets, Tensor):
        raise TypeError(
            "targets must be a torch.Tensor, or a tuple passed as "
            f"loss_func(outputs, *targets); got {type(targets).__name__}."
        )
    check_target_tensor(targets, outputs)
    check_batch_size(targets, outputs)
    inner = loss_func.loss
    if isinstance(inner, CLASS_LOSSES) and not (
        isinstance(inner, nn.NLLLoss) and targets.is_floating_point()
    ):
        check_class_targets(type(inner).__name__, inner.ignore_index, outputs, targets)


def check_targets(
    loss_func: nn.Module, outputs: Tensor, targets: object, structure: bool = True
) -> None:
    """Raise if ``targets`` do not fit ``outputs``, or the loss lacks the structure.

    For the closed-form losses: shapes, dtypes and ranges of the targets. For every
    other loss (resolved into an
    :class:`~lowrank_ggn.core.losses.autodiff.AutodiffLoss`, whose ``reduction`` this
    fixes): the targets are a tensor with ``N`` rows or a tuple with such an entry,
    and the numerical check that ``L = ρ Σ_n ℓ_n`` with a Hessian that does not
    couple samples (:func:`~lowrank_ggn.core.losses.autodiff.check_structure`).

    Args:
        loss_func: A loss (see
            :func:`~lowrank_ggn.core.loss_factors.check_loss_func`), preferably
            resolved by :func:`~lowrank_ggn.core.loss_factors.resolve_loss` so that
            the determined ``reduction`` is kept.
        outputs: Model outputs ``[N, *out]``.
        targets: Targets for the batch (a tuple: ``loss_func(outputs, *targets)``).
        structure: Run the numerical structure check (the audit reports it instead).

    Raises:
        ValueError, TypeError, NotImplementedError: Naming what does not fit.

    """
    _check_outputs(outputs)
    form = closed_form(loss_func)
    if form is None:
        loss_func = resolve_loss(loss_func)
        _check_autodiff_targets(loss_func, outputs, targets)
        if structure:
            check_structure(loss_func, outputs, targets)
        return
    form.check_targets(loss_func, outputs, targets)
