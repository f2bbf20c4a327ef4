r"""The explicit factors ``Vᵀ`` ``[N·C, D]`` from the layer-wise engine's strategies.

The data-set GGN's dense solver (:mod:`lowrank_ggn.approx.dataset`) needs every
batch's rows ``Vᵀ``, not its Gram: its Gram has cross-batch blocks ``V_aᵀ V_b``. This
module runs the same stages as the one-batch Gram (:func:`~.run.run_engine`: captured
forward pass, cost model or forced strategy, backward passes, self-check, and the
same runs again on a mixing layer, a failed self-check or the budget) and lays the
strategy's factors out as rows, block by block, in the order of
``lin.fmodel.params``:

* captured layers: the explicit rows of their operands
  (:func:`~.assemble.layer_chunks`; Kronecker layers too), mixing layers' explicit
  blocks, shared parameters' rows summed over their uses;
* BatchNorm affines: their frozen rows;
* under ``bn_split``: ``V_p = V_{f,p} + (B_p W)ᵀ`` for every parameter that the
  statistics directions reach;
* parameters of no captured layer: their generic rows as the strategy found them.

Where the engine has no per-layer factors (``streamed`` chosen or forced, the
``generic`` strategy, no strategy passing its self-check) or would take the same
passes (``columns`` chosen by the cost model: ``N·C`` full-batch passes either
way), the rows come from
:meth:`~lowrank_ggn.core.linearization.Linearization.factors_matrix` (one vmapped
backward pass per column block); the report's ``strategy`` is then ``generic`` and
its ``fallback`` says why.

Cost against ``factors_matrix``: the strategy's backward passes (``C`` batch passes
on the per-sample path instead of ``C`` vmapped per-sample passes; ``bn_split`` its
``C`` frozen passes plus the statistics directions instead of ``N·C`` full-batch
passes) plus one GEMM per layer and column chunk; the same ``[N·C, D]`` result.
Rows are in the parameters' dtype; whoever forms a Gram from them sums it in the
accumulation dtype (:func:`lowrank_ggn.core.precision.accumulation_dtype`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import Tensor

from lowrank_ggn.core.engine.assemble import (
    check_finite,
    layer_chunks,
    record_generic,
)
from lowrank_ggn.core.engine.capture import Captured
from lowrank_ggn.core.engine.report import EngineReport, LayerTreatment
from lowrank_ggn.core.engine.run import _Engine, run_engine
from lowrank_ggn.core.engine.selfcheck import Factors
from lowrank_ggn.core.engine.unavailable import LayerwiseUnavailable, SelfCheckFailed
from lowrank_ggn.core.modes import Strategy
from lowrank_ggn.core.options import GGNOptions
from lowrank_ggn.core.paths import PER_SAMPLE

if TYPE_CHECKING:
    from lowrank_ggn.core.linearization import Linearization

#: The report's ``fallback`` when the rows come from ``factors_matrix``.
GENERIC_ROWS = "no per-layer factors ({why}): rows from lin.factors_matrix"


def rows_from_factors(
    f: Factors, budget: int, treatments: dict[str, LayerTreatment]
) -> Tensor:
    """``Vᵀ`` ``[NC, D]`` from one strategy's checked factors (module docstring).

    Args:
        f: The factors (freed layer by layer as their rows are laid out).
        budget: Bytes for one chunk of a layer's explicit rows.
        treatments: Filled with each layer's treatment.

    Returns:
        ``[NC, D]`` in the parameters' dtype, columns in ``lin.fmodel.params`` order.
    """
    lin = f.lin
    fm, NC = lin.fmodel, lin.num_columns
    Vt = lin.outputs.new_zeros(NC, fm.num_params)
    start, offset = {}, 0
    for p in fm.params:
        start[id(p)], offset = offset, offset + p.numel()

    def block(p: Tensor) -> Tensor:  # p's columns of Vt, a view
        return Vt[:, start[id(p)] : start[id(p)] + p.numel()]

    for la in f.layers:
        check_finite(la)
        split = f.W is not None and any(id(p) in f.B for p in la.params)
        for p, cols, part in layer_chunks(la, f, budget):
            block(p)[:, cols] += part  # shared parameters: summed over their uses
        if la.shared:
            treatments[la.name] = LayerTreatment.SHARED
        elif not la.local:
            treatments[la.name] = LayerTreatment.MIXING
        else:
            local = LayerTreatment.SPLIT if split else LayerTreatment.LOCAL_EXPLICIT
            treatments[la.name] = local
        la.grads, la.explicit = [], []  # free as we go
    for bn in f.bns:
        for p, rows in zip(bn.params, bn.affine_rows()):
            block(p).add_(rows)
        if bn.params:
            treatments[bn.name] = LayerTreatment.SPLIT
    for p, rows in zip(f.generic, f.generic_rows):
        block(p).add_(rows.reshape(NC, -1))
    if f.W is not None:  # V_p += (B_p W)ᵀ, once per parameter
        for p in fm.params:
            if id(p) in f.B:
                block(p).addmm_(f.coefficients_for(p), f.B[id(p)])
    record_generic(f, treatments)
    return Vt


def _lay_out(forced: bool) -> Callable[[_Engine, Captured, Strategy], Tensor]:
    """:func:`~.run.run_engine`'s last stage: the checked factors laid out as rows.

    ``streamed`` has no per-layer factors; ``columns`` unless ``forced`` would take
    the ``N·C`` full-batch passes of ``factors_matrix`` and lay the rows out besides
    (3c3d-BN, ``N = 32``: 87.8 s against 75.0 s): both raise
    :class:`LayerwiseUnavailable` for the caller's ``factors_matrix``.
    """

    def finish(engine: _Engine, c: Captured, chosen: Strategy) -> Tensor:
        if chosen is Strategy.STREAMED or (chosen is Strategy.COLUMNS and not forced):
            engine.report.strategy = chosen
            raise LayerwiseUnavailable(engine.report)
        return engine.run(
            c,
            chosen,
            lambda f, groups, acc, left, layers: rows_from_factors(f, left, layers),
        )

    return finish


def layerwise_rows(
    lin: Linearization, options: GGNOptions, budget: float | None = None
) -> tuple[Tensor, EngineReport]:
    """``Vᵀ`` ``[N·C, D]`` of a captured linearisation, and how it was found.

    Args:
        lin: The linearised model (its capture is consumed).
        options: ``strategy`` (``None``: the cost model; ``GENERIC``:
            ``factors_matrix``), ``chunk``; ``accumulate`` does not enter the rows
            (they are in the parameters' dtype).
        budget: Bytes the engine may hold in factor blocks and chunks (``None``:
            ``options.memory_budget``).

    Returns:
        ``(rows, report)``: rows sample-major (``i = n·C + c``), columns flattened in
        ``lin.fmodel.params`` order; the :class:`EngineReport` of the run.

    Raises:
        StrategyUnavailable: A forced strategy does not apply to the model.
        MemoryBudgetExceeded: A forced strategy's factors exceed ``budget``.

    Example:
        >>> import torch
        >>> from lowrank_ggn.core.linearization import linearize
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
        >>> lin = linearize(model, torch.nn.CrossEntropyLoss(), X, y)
        >>> rows, report = layerwise_rows(lin, GGNOptions())
        >>> assert torch.allclose(rows, lin.factors_matrix())
        >>> report.strategy
        <Strategy.PER_SAMPLE: 'per_sample'>
    """
    budget = int(min(options.memory_budget if budget is None else budget, 2**62))
    if options.generic:
        report = EngineReport(Strategy.GENERIC, reason="strategy='generic'")
        report.fallback = GENERIC_ROWS.format(why="strategy='generic'")
    else:
        finish = _lay_out(options.strategy is not None)
        try:
            return run_engine(lin, finish, options.chunk, budget, options.strategy)
        except SelfCheckFailed as err:
            report = EngineReport(
                Strategy.GENERIC,
                reason="layer-wise self-check failed: a parameter is used outside "
                "its layer",
                fallback=GENERIC_ROWS.format(
                    why=f"{err.report.strategy} failed its self-check"
                ),
            )
        except LayerwiseUnavailable as err:
            report = err.report  # streamed or columns, after an earlier fallback too
            why = GENERIC_ROWS.format(why=f"{report.strategy}")
            report.fallback = "; ".join(filter(None, (report.fallback, why)))
            report.strategy = Strategy.GENERIC
        if lin.path.name != PER_SAMPLE:  # full-batch passes through the graph:
            # the captured one recomputes BatchNorm in elementary ops whose backward
            # costs more; factors_matrix's passes run on a plain forward pass
            lin.release_graph()
            report.count("forward")
    report.count("backward", lin.num_columns)
    return lin.factors_matrix(options.chunk), report


__all__ = ["GENERIC_ROWS", "layerwise_rows", "rows_from_factors"]
