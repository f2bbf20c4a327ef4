r"""Per-component GGN diagonals ``d_n = Σ_c (J_θF_nᵀ s_nc)²`` ``[N, D]``.

They sum to ``diag(G)`` (:mod:`lowrank_ggn.core.diagonal`, which computes them by the
same routes); with ``ρ`` of ``L = ρ Σ_n ℓ_n`` (``1/N`` for ``'mean'``, 1 for
``'sum'``, as for :mod:`lowrank_ggn.diagnostics.moments`), ``d_n / ρ`` is the
diagonal of sample ``n``'s own GGN ``J_nᵀ ∇²ℓ_n J_n`` when samples are independent
(BackPACK's ``BatchDiagGGNExact`` returns the rows ``d_n``). Under train-mode
BatchNorm ``F_n`` depends on the whole batch: the ``d_n`` are per-component, and
still sum to the exact diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowrank_ggn.core.diagonal import GGNDiagonal, diagonal_values
from lowrank_ggn.core.linearization import Linearization
from lowrank_ggn.core.options import GGNOptions
from lowrank_ggn.diagnostics.moments import component_context
from lowrank_ggn.diagnostics.warnings import PerComponentResult


@dataclass
class PerComponentDiagonals(PerComponentResult):
    """Result of :meth:`lowrank_ggn.GGN.per_component_diagonals`.

    Attributes:
        per_param: Per parameter ``[N_S, *θ_p.shape]``: row ``j`` is
            ``d_n = Σ_c (J_θF_nᵀ s_nc)²`` for ``n = sample_index[j]`` (``ρ``
            included: the rows sum to the diagonal; ``d_n / ρ`` is per sample).
        sample_index: ``[N_S]`` batch positions of the rows (all ``N`` unless
            sub-sampled).
        diagonal: Their sum, the :class:`GGNDiagonal`.
        rho, sample_mixing, mixing_modules, explanation, path: see
            :class:`~lowrank_ggn.diagnostics.warnings.PerComponentResult`.
    """

    per_param: list[Tensor]
    sample_index: Tensor
    diagonal: GGNDiagonal

    WHAT = "per_component_diagonals returned per-component GGN diagonals"
    SUMS_TO = "the GGN diagonal"

    @property
    def flat(self) -> Tensor:
        """``[N_S, D]``, parameters flattened in ``params`` order."""
        return torch.cat([d.reshape(d.shape[0], -1) for d in self.per_param], 1)


def diagonal_explanation(sample_mixing: bool, modules: tuple[str, ...]) -> str:
    """What row ``n`` of a per-component diagonal means, for ``.explanation``."""
    if not sample_mixing:
        return (
            "The forward pass processes samples independently (F_n = f(x_n, θ)), so "
            "row n is ρ times the diagonal of sample n's own GGN J_nᵀ ∇²ℓ_n J_n "
            "(BackPACK's BatchDiagGGN). The rows sum to the GGN diagonal."
        )
    where = (
        f"module(s) {', '.join(modules)} mix samples in the forward pass"
        if modules
        else "the forward pass mixes samples"
    )
    return (
        f"Per-sample GGNs do not exist here: {where}, so output F_n depends on every "
        "input x_m. Row n is a per-component diagonal, Σ_c (J_θF_nᵀ s_nc)² through "
        "output component F_n, not the curvature of sample n alone. The rows still "
        "sum to the exact GGN diagonal, but their spread is not a sampling variance."
    )


def per_component_from_linearization(
    lin: Linearization,
    options: GGNOptions,
    work: float,
    mc_samples: int | None = None,
) -> PerComponentDiagonals:
    """Per-component diagonals ``d_n`` of ``lin``'s factors (arguments as above).

    :meth:`PerComponentDiagonals.warn` issues the
    :class:`~lowrank_ggn.diagnostics.warnings.SampleMixingWarning`.
    """
    values, route, report = diagonal_values(lin, options, work, per_component=True)
    NS = lin.num_samples
    rows = [v.reshape(NS, *p.shape) for v, p in zip(values, lin.fmodel.params)]
    total = GGNDiagonal(
        [r.sum(0) for r in rows], lin.path, mc_samples, lin.num_columns, route, report
    )
    context = component_context(lin)
    context["explanation"] = diagonal_explanation(
        context["sample_mixing"], context["mixing_modules"]
    )
    return PerComponentDiagonals(
        per_param=rows, sample_index=lin.sample_index, diagonal=total, **context
    )


__all__ = [
    "PerComponentDiagonals",
    "diagonal_explanation",
    "per_component_from_linearization",
]
