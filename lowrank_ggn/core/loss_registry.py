"""The loss registry's former home: see :mod:`lowrank_ggn.core.losses.registry`."""

from lowrank_ggn.core.losses.registry import (  # re-exported: the old import path
    CLASS_LOSSES,
    SUPPORTED_LOSSES,
    check_loss_func,
    has_closed_form,
    resolve_loss,
)

__all__ = [
    "CLASS_LOSSES",
    "SUPPORTED_LOSSES",
    "check_loss_func",
    "has_closed_form",
    "resolve_loss",
]
