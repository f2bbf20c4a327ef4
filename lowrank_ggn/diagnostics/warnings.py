r"""What per-component quantities mean when a forward pass mixes samples.

BatchNorm in train mode normalises every sample with the mean and variance of the
whole batch, so output ``F_n(X, θ)`` depends on every input ``x_m``, not on ``x_n``
alone. The vector-Jacobian product ``J_θF_nᵀ ∂L/∂F_n`` is then a *per-component
gradient*, the gradient through output component ``F_n``, and no longer ``ρ`` times
the gradient of sample ``n``: per-sample gradients do not exist for such a model.
The components still sum to the batch gradient, and the GGN still factorises as
``G = V Vᵀ``, but their mean, variance and SNR are no sampling statistics, because
the components are not independent draws. BatchNorm in eval mode normalises with its
running statistics, processes samples independently, and is not affected.

Every function that returns per-component quantities
(:func:`lowrank_ggn.gradient_moments`, :func:`lowrank_ggn.directional_derivatives`)
says this in two places, with the texts of this module: the result's
``.explanation`` (:func:`per_component_explanation`) and, once per call, a
:class:`SampleMixingWarning` that names the mixing modules
(:func:`warn_sample_mixing`).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from lowrank_ggn.core.paths import EnginePath

#: The package's folder: a warning points at the first frame outside it.
_PACKAGE = str(Path(__file__).resolve().parents[1])


class SampleMixingWarning(UserWarning):
    """Per-component quantities of a forward pass that mixes samples were returned.

    Issued once per call by every function that returns per-component quantities
    (:func:`lowrank_ggn.gradient_moments`, :func:`lowrank_ggn.directional_derivatives`)
    when output ``F_n`` depends on other inputs than ``x_n``. Filter it with
    ``warnings.simplefilter("ignore", SampleMixingWarning)``.
    """


def per_component_explanation(sample_mixing: bool, modules: Sequence[str] = ()) -> str:
    """What row ``n`` of a per-component quantity means, for the result's ``.explanation``.

    Args:
        sample_mixing: Whether the forward pass mixes samples.
        modules: Qualified names of the modules that mix them (may be empty).

    Returns:
        A paragraph of plain text.

    """
    if not sample_mixing:
        return (
            "The forward pass processes samples independently (F_n = f(x_n, θ)), so "
            "row n is ρ times the per-sample gradient ∇_θ ℓ(f(x_n, θ), y_n). The rows "
            "sum to the batch gradient; their mean, variance and SNR are sample "
            "statistics of per-sample quantities."
        )
    where = (
        f"module(s) {', '.join(modules)} mix samples in the forward pass"
        if modules
        else "the forward pass mixes samples (found numerically; no module named)"
    )
    return (
        f"Per-sample quantities do not exist here: {where}, so output F_n depends on "
        "every input x_m. Row n is a per-component quantity, the derivative through "
        "output component F_n (J_θF_nᵀ ∂L/∂F_n for gradients), not the contribution "
        "of sample n alone. The rows still sum to the batch gradient (resp. their "
        "ρ-weighted curvatures to eᵀGe), but their mean, variance and SNR describe "
        "the spread of the components, not a sampling variance of per-sample "
        "gradients: the components are not independent draws."
    )


def warn_sample_mixing(
    modules: Sequence[str], what: str, sums_to: str, stacklevel: int | None = None
) -> None:
    """Issue one :class:`SampleMixingWarning` for a call that returned ``what``.

    Args:
        modules: Qualified names of the mixing modules (may be empty).
        what: The call and what it returned, e.g. ``"gradient_moments returned
            per-component gradients"``.
        sums_to: The batch quantity that the components sum to.
        stacklevel: Passed to :func:`warnings.warn`; ``None``: the first caller
            outside the package (the user's call, through any wrapper).

    """
    where = (
        f"module(s) {', '.join(modules)} mix samples"
        if modules
        else "the forward pass mixes samples"
    )
    if stacklevel is None:
        stacklevel = _outside_stacklevel()
    warnings.warn(
        f"{what}: {where} in the forward pass, so these are per-component, not "
        f"per-sample quantities. They sum to {sums_to}, but their variance is not a "
        "sampling variance. See result.explanation.",
        SampleMixingWarning,
        stacklevel=stacklevel,
    )


@dataclass
class PerComponentResult:
    """A result of per-sample rows, or per-component ones when samples mix.

    Subclasses name what they hold (``WHAT``) and what the rows sum to
    (``SUMS_TO``).

    Attributes:
        rho: ``ρ`` in ``L = ρ Σ_n ℓ_n``: ``1/N`` for ``'mean'``, 1 for ``'sum'``.
        sample_mixing: Whether the forward pass mixes samples (rows are then
            per-component, not per-sample, quantities).
        mixing_modules: Qualified names of the modules that mix samples.
        explanation: What row ``n`` means for this model.
        path: The engine's path (``per_sample`` or ``full_batch``).
    """

    rho: float
    sample_mixing: bool
    mixing_modules: tuple[str, ...]
    explanation: str
    path: EnginePath

    WHAT: ClassVar[str] = "per-component quantities were returned"
    SUMS_TO: ClassVar[str] = "the batch quantity"

    def warn(self, stacklevel: int | None = None) -> None:
        """Issue the :class:`SampleMixingWarning` if the rows are per-component.

        ``stacklevel`` as for :func:`warn_sample_mixing` (``None``: the user's call).
        """
        if self.sample_mixing:
            warn_sample_mixing(self.mixing_modules, self.WHAT, self.SUMS_TO, stacklevel)


def _outside_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside the package.

    Counted from the function that calls this one and then :func:`warnings.warn`
    (level 1).
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level
