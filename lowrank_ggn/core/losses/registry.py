"""The registry: which losses have closed-form factors; every other loss for autodiff.

:data:`CLOSED_FORMS` maps a ``torch.nn`` loss type to its :class:`ClosedFormLoss`;
:func:`closed_form` finds it for a loss with default options (no class weights, no
``pos_weight``, no label smoothing), and :func:`resolve_loss` wraps every other
callable into an :class:`~lowrank_ggn.core.losses.autodiff.AutodiffLoss`, whose
factors come from autodiff Hessians beside the closed forms.
"""

from __future__ import annotations

from torch import nn

from lowrank_ggn.core.losses.autodiff import MODULE_REDUCTIONS, AutodiffLoss
from lowrank_ggn.core.losses.base import ClosedFormLoss
from lowrank_ggn.core.losses.binary_cross_entropy import BinaryCrossEntropyWithLogits
from lowrank_ggn.core.losses.cross_entropy import CrossEntropy
from lowrank_ggn.core.losses.squared_error import SquaredError

#: The closed forms, by exact loss type.
CLOSED_FORMS: dict[type, ClosedFormLoss] = {
    form.module: form
    for form in (CrossEntropy(), SquaredError(), BinaryCrossEntropyWithLogits())
}

#: Losses with closed-form factors (exact types, default options).
SUPPORTED_LOSSES = tuple(CLOSED_FORMS)

#: Losses whose class-index targets are checked like cross-entropy's.
CLASS_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss)


def check_loss_func(loss_func: object) -> None:
    """Raise if ``loss_func`` cannot be a per-sample loss plus reduction.

    Accepts any callable ``loss_func(outputs, targets) -> scalar`` (a loss module or
    a function); whether it has the structure is checked numerically on the first
    batch (:func:`~lowrank_ggn.core.loss_targets.check_targets`). Refused here,
    before any forward pass:

    Raises:
        TypeError: If ``loss_func`` is not callable.
        NotImplementedError: For a module with ``reduction`` other than ``'mean'``,
            ``'batchmean'`` or ``'sum'`` (``'none'``: no scalar loss), and for
            ``CrossEntropyLoss``/``NLLLoss`` with class weights and
            ``reduction='mean'``, which divide by the batch's total weight
            ``Σ_n w_{y_n}`` instead of a fixed ``ρ``.

    """
    if isinstance(loss_func, AutodiffLoss):
        return
    if not callable(loss_func):
        raise TypeError(
            "loss_func must be callable as loss_func(outputs, targets) -> scalar (a "
            f"torch.nn loss module or a function); got {type(loss_func).__name__}. "
            "Pass e.g. torch.nn.CrossEntropyLoss()."
        )
    if not isinstance(loss_func, nn.Module):
        return
    name = type(loss_func).__name__
    reduction = getattr(loss_func, "reduction", None)
    if reduction is not None and reduction not in MODULE_REDUCTIONS:
        raise NotImplementedError(
            f"loss_func.reduction={reduction!r} is not supported: the GGN needs a "
            "scalar loss. Use reduction='mean' or 'sum'."
        )
    if (
        isinstance(loss_func, CLASS_LOSSES)
        and getattr(loss_func, "weight", None) is not None
        and reduction == "mean"
    ):
        raise NotImplementedError(
            f"{name}(weight=...) with reduction='mean' is not supported: it divides "
            "by the batch's total class weight Σ_n w[y_n], not by a fixed number, so "
            "the loss is not ρ Σ_n ℓ_n. Use reduction='sum' (divide by your own "
            "constant if needed) or drop weight."
        )


def closed_form(loss_func: object) -> ClosedFormLoss | None:
    """The :class:`ClosedFormLoss` of ``loss_func``: exact type, default options."""
    form = CLOSED_FORMS.get(type(loss_func))
    if (
        form is None
        or getattr(loss_func, "weight", None) is not None
        or getattr(loss_func, "pos_weight", None) is not None
        or getattr(loss_func, "label_smoothing", 0.0) != 0.0
    ):
        return None
    return form


def has_closed_form(loss_func: object) -> bool:
    """Whether ``loss_func`` has closed-form factors: exact type, default options."""
    return closed_form(loss_func) is not None


def resolve_loss(loss_func: object) -> nn.Module:
    """The loss as the engine uses it.

    Closed-form losses (exact ``CrossEntropyLoss``, ``MSELoss``,
    ``BCEWithLogitsLoss`` without weights or label smoothing) are returned
    unchanged; every other loss is wrapped in an
    :class:`~lowrank_ggn.core.losses.autodiff.AutodiffLoss` (a wrapper is returned as
    it is). Pass one resolved loss to every batch: its ``reduction`` is fixed by the
    first batch that determines it.

    Raises:
        TypeError, NotImplementedError: See :func:`check_loss_func`.

    Example:
        >>> import torch
        >>> assert type(resolve_loss(torch.nn.MSELoss())) is torch.nn.MSELoss
        >>> wrapped = resolve_loss(torch.nn.HuberLoss(reduction="sum"))
        >>> assert wrapped.reduction == "sum" and resolve_loss(wrapped) is wrapped

    """
    check_loss_func(loss_func)
    if isinstance(loss_func, AutodiffLoss) or has_closed_form(loss_func):
        return loss_func
    return AutodiffLoss(loss_func)


__all__ = [
    "CLASS_LOSSES",
    "CLOSED_FORMS",
    "SUPPORTED_LOSSES",
    "check_loss_func",
    "closed_form",
    "has_closed_form",
    "resolve_loss",
]
