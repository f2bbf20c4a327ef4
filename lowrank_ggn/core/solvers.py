r"""Which eigensolver, and the matrix-free one: block Lanczos on the Gram operator.

``solver="dense"`` forms the Gram matrix (:mod:`lowrank_ggn.core.engine`) and calls
``eigh``: every nonzero eigenvalue. ``solver="lanczos"`` finds the ``top_k`` eigenpairs
of ``𝒢 = Sᵀ J Jᵀ S`` from operator products alone (:mod:`lowrank_ggn.core.lanczos`, one VJP
and one JVP per vector, :class:`lowrank_ggn.core.engine.streamed.GramOperator`), in memory
``B·D`` and exact for BatchNorm in train mode. ``solver="auto"`` compares the two by
the cost model of :func:`choose_solver`.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from lowrank_ggn.core.budget import resolve_memory_budget
from lowrank_ggn.core.engine.report import EngineReport
from lowrank_ggn.core.engine.streamed import GramOperator, block_width
from lowrank_ggn.core.lanczos import top_eigenpairs
from lowrank_ggn.core.linearization import Linearization
from lowrank_ggn.core.model import labelled_module
from lowrank_ggn.core.modes import Solver, Strategy
from lowrank_ggn.core.paths import PER_SAMPLE, batch_statistic_modules
from lowrank_ggn.core.precision import ErrorModel
from lowrank_ggn.core.progress import PassProgress
from lowrank_ggn.core.spectrum import GramEigenpairs, ritz_pairs

#: Cost model of ``solver="auto"``: operator products (one VJP plus one JVP each) that
#: block Lanczos needs per wanted eigenpair (measured: 4.4 on 3c3d-BN, ``k = 10``).
LANCZOS_PRODUCTS_PER_EIGENPAIR = 5


def check_solver(
    solver: str,
    top_k: int | None,
    generic: bool = False,
    allowed: tuple[Solver, ...] = tuple(Solver),
) -> Solver:
    """``solver`` as a :class:`Solver`, checked against the other options (no model call).

    Args:
        solver: The user's string.
        top_k: The eigenpairs wanted (a matrix-free solver needs it).
        generic: ``engine="generic"`` (explicit ``Vᵀ``): dense only.
        allowed: The solvers of the calling entry (the data-set path has no
            ``"auto"``).
    """
    names = tuple(s.value for s in allowed)
    if solver not in names:
        raise ValueError(f"solver must be one of {names}; got {solver!r}.")
    chosen = Solver(solver)
    if chosen is Solver.DENSE:
        return chosen
    if top_k is None:
        raise ValueError(
            f"solver={solver!r} needs top_k: a matrix-free solver finds the top_k "
            "eigenpairs only; pass top_k=k, or use solver='dense' for every "
            "nonzero eigenvalue."
        )
    if generic:
        raise ValueError(
            f"solver={solver!r} works on the whole GGN with engine='layerwise'; drop "
            "engine='generic', or use solver='dense'."
        )
    return chosen


def choose_solver(lin: Linearization, top_k: int) -> Solver:
    """``"auto"``: Lanczos where its products are cheaper than the Gram's passes.

    Dense work (full-batch pass equivalents, :mod:`lowrank_ggn.core.engine.plan`) is ``C``
    on the per-sample path and at most ``min(N·C, C + Σ_l 2K_l)`` otherwise; Lanczos
    needs about :data:`LANCZOS_PRODUCTS_PER_EIGENPAIR` · ``top_k`` products of two
    passes each.
    """
    C, NC = lin.num_columns_per_sample, lin.num_columns
    if lin.path.name == PER_SAMPLE:
        dense = C
    else:
        model = lin.fmodel.model
        stats = sum(
            2 * labelled_module(model, n).num_features
            for n in batch_statistic_modules(model)
        )
        dense = min(NC, C + stats) if stats else NC
    lanczos = 2 * LANCZOS_PRODUCTS_PER_EIGENPAIR * top_k
    return Solver.LANCZOS if lanczos < dense else Solver.DENSE


def lanczos_block_size(k: int, device: torch.device) -> int:
    """Columns per Lanczos block: narrow on CPUs, where products run one by one.

    Narrow blocks need the fewest products in all: for ``k = 10`` on 3c3d with
    train-mode BatchNorm (``N = 128``, float32) blocks of 4, 6 and 8 took 44, 54 and
    72 products; on synthetic GGN-like spectra blocks of 20 take 100–140. On
    accelerators a block is one batched pass, so wider blocks (fewer calls) pay.
    """
    if device.type == "cpu":
        return max(2, min(k, 4))
    return max(2 * k, k + 8)


def lanczos_eigenpairs(
    lin: Linearization,
    top_k: int,
    memory_budget: float | None,
    progress: bool | None,
) -> tuple[Tensor, Tensor, Tensor, EngineReport]:
    """Top-``k`` eigenpairs of ``𝒢 = Sᵀ J Jᵀ S`` without forming it (block Lanczos).

    Each operator product is one VJP and one JVP
    (:class:`lowrank_ggn.core.engine.streamed.GramOperator`).

    Returns:
        ``(eigenvalues [k] descending, Gram eigenvectors [NC, k], residual norms
        ‖𝒢 u_k − λ_k u_k‖ [k], report)``; the
        :class:`~lowrank_ggn.core.engine.EngineReport` counts the products.
    """
    report = EngineReport(Strategy.STREAMED, solver=Solver.LANCZOS)
    report.reason = "matrix-free: block Lanczos on the Gram operator"
    NC = lin.num_columns
    k = min(top_k, NC)
    budget = int(min(resolve_memory_budget(memory_budget), 2**62))
    width = block_width(lin, budget)
    bar = PassProgress(progress, desc="GGN Lanczos products")

    expected = LANCZOS_PRODUCTS_PER_EIGENPAIR * k
    op = GramOperator(lin, report, expected_jvps=expected)

    def matmat(U: Tensor) -> Tensor:
        start = time.perf_counter()
        parts = [op.apply(U[:, i : i + width])[0] for i in range(0, U.shape[1], width)]
        if bar.bar is None and report.passes.get("backward", 0) == U.shape[1]:
            per_product = (time.perf_counter() - start) / U.shape[1]
            bar.start(expected, seconds=per_product * expected)
        bar(U.shape[1])
        return torch.cat(parts, dim=1)

    try:
        evals, evecs, info = top_eigenpairs(
            matmat,
            NC,
            k,
            dtype=lin.outputs.dtype,
            device=lin.outputs.device,
            block_size=lanczos_block_size(k, lin.outputs.device),
        )
    finally:
        bar.close()
    return evals, evecs, info.residuals, report


def lanczos_pairs(
    lin: Linearization,
    top_k: int,
    rtol: float | None,
    model: ErrorModel,
    memory_budget: float | None,
    progress: bool | None,
) -> tuple[GramEigenpairs, EngineReport]:
    """Lanczos eigenpairs with error estimates (:func:`~lowrank_ggn.core.spectrum.ritz_pairs`), and the report."""
    evals, evecs, res, report = lanczos_eigenpairs(lin, top_k, memory_budget, progress)
    return ritz_pairs(evals, evecs, res, rtol, top_k, model), report


__all__ = [
    "lanczos_pairs",
    "LANCZOS_PRODUCTS_PER_EIGENPAIR",
    "check_solver",
    "choose_solver",
    "lanczos_block_size",
    "lanczos_eigenpairs",
]
