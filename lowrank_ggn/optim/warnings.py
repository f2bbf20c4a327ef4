"""Warnings of :class:`~lowrank_ggn.optim.DampedNewton`, one class per surprise.

Filter them as any ``UserWarning``, e.g.
``warnings.simplefilter("ignore", TopKWarning)``.
"""

from __future__ import annotations

import warnings


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


def warn_top_k(top_k: int, K: int, num_samples: int, columns: int) -> None:
    """Issue the :class:`TopKWarning` of a step that resolved ``K < top_k`` directions.

    ``num_samples`` and ``columns`` are ``N_S`` and ``C`` (rank ``≤ N_S·C``).
    """
    rank = f"rank ≤ N·C = {num_samples}·{columns}"
    advice = f"Pass top_k ≤ {K} to ask for what exists" if K else "No Newton step"
    warnings.warn(
        f"top_k={top_k} is above the {K} eigenvalues this batch's GGN "
        f"resolves ({rank}); the steps use the {K} directions there are. "
        f"{advice} (this warning is issued once per optimiser).",
        TopKWarning,
        stacklevel=4,  # the caller of step (through torch.optim's wrapper)
    )


__all__ = ["NoProgressWarning", "TopKWarning", "warn_top_k"]
