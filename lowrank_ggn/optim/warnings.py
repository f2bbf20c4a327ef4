"""Warnings of :class:`~lowrank_ggn.optim.DampedNewton`, one class per surprise.

Filter them as any ``UserWarning``, e.g.
``warnings.simplefilter("ignore", TopKWarning)``.
"""

from __future__ import annotations


class TopKWarning(UserWarning):
    """``top_k`` asked for more directions than the batch's GGN resolves.

    The step uses the ``K < top_k`` resolved eigen-directions (the GGN of a batch has
    rank ``≤ N·C``, fewer where eigenvalues are below the precision's noise floor).
    Issued once per optimiser.
    """


class NoProgressWarning(UserWarning):
    """A step left the parameters where they were.

    No direction had a finite damping (or ``lr = 0``) and the complement's rate and
    the weight decay were 0, so ``Δθ = 0``. Issued by each such step.
    """


__all__ = ["NoProgressWarning", "TopKWarning"]
