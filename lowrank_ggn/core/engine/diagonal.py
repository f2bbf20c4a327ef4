r"""The GGN diagonal from the layer-wise engine's factors, without forming ``V``.

.. math::
    \operatorname{diag}(G) = \sum_{n,c} (J_θF_n^⊤ s_{nc})^{⊙2}
    = \sum_i V_{:,i}^{⊙2}, \qquad
    d_n = \sum_c (J_θF_n^⊤ s_{nc})^{⊙2}, \quad \sum_n d_n = \operatorname{diag}(G),

squares elementwise. The engine's backward passes (:mod:`.backprop`, strategy chosen
by :mod:`.plan`, checked by :mod:`.selfcheck`) give every column's layer-output
gradients ``g_i`` ``[P, O]`` and, per layer, the operand its rows are bilinear in
(:mod:`.operands`); this module squares those rows layer by layer instead of
multiplying them into a Gram matrix:

* a dense layer with one position (``Linear``, ``P = 1``):
  ``diag(W)_{oi} = Σ_n (Σ_c g_{nco}²) a_{ni}²``, i.e. ``(g²)ᵀ (a²)``: ``N·D_l``
  flops, no row is ever formed (both sides balanced by a power of two first, so
  that no square overflows where the product does not);
* a dense layer over ``P > 1`` positions (convolutions of any dimension, grouped
  and depthwise included, a ``Linear`` over a sequence): per sample the weight rows
  of each column, ``g_ncᵀ A_n`` (``[O_g, I_g]`` per group), one batched GEMM per
  column and chunk of samples (and channels) that fits in cache
  (:data:`CHUNK_BYTES`), squared in place and summed over ``n`` and ``c``:
  ``NC·P·D_l`` flops, the same as BackPACK's ``DiagGGNExact``, without laying out
  ``[NC, D_l]`` rows or copying ``g``;
* every other captured weight (transposed convolutions, embeddings, normalisation
  affines): its explicit rows ``V_l`` ``[NC, cols]`` in chunks within the memory
  budget (the operand's ``explicit``), squared and summed over the columns ``i``;
* under ``bn_split`` a layer upstream of BatchNorm statistics adds ``(B_p W)ᵀ`` to
  each chunk before squaring (``V_p = V_{f,p} + B_p W``, exact for train-mode
  BatchNorm), its bias likewise; BatchNorm affines are their frozen rows plus
  ``(B_p W)ᵀ``;
* biases ``Σ_P g`` ``[NC, O]``, mixing layers' explicit rows (``columns``), shared
  parameters' rows summed over their uses, and the generic rows of uncaptured
  parameters: squared and summed.

Per-component rows ``d_n`` sum the squares over the ``C`` columns of each sample
only (rows are sample-major, ``i = n·C + c``). Cost: the strategy's backward passes
(``C`` on the per-sample path; ``bn_split`` adds its statistics passes and
``NC·2K·D_l`` for ``(B_p W)ᵀ`` per upstream layer) plus ``Σ_l NC·P_l·D_l`` flops for
the layers over positions and ``N·D_l`` for the others; no Gram matrix. Memory: the
strategy's layer-output gradients (``N·C·Σ_l P_l·O_l``), one chunk, and the result
(``D``, or ``N·D`` per component).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lowrank_ggn.core.budget import MemoryBudgetExceeded
from lowrank_ggn.core.engine import accumulate as acc
from lowrank_ggn.core.engine.assemble import layer_rows
from lowrank_ggn.core.engine.backprop import LayerTurnedMixing
from lowrank_ggn.core.engine.layer import Layer
from lowrank_ggn.core.engine.operands import DenseOperand
from lowrank_ggn.core.engine.report import EngineReport, LayerTreatment
from lowrank_ggn.core.engine.run import (
    LayerwiseUnavailable,
    SelfCheckFailed,
    _Engine,
    _no_tick,
)
from lowrank_ggn.core.engine.selfcheck import Factors, self_check
from lowrank_ggn.core.modes import Strategy

if TYPE_CHECKING:
    from lowrank_ggn.core.linearization import Linearization

#: Bytes of one chunk of squared weight rows (:func:`_dense_squares`, twice: the
#: sum and one product): small enough to stay in cache (3c3d's convolutions on one
#: core: 2 MiB 0.91×, 64 MiB 1.16× the time of 8 MiB), large enough that few
#: parallel regions wait on each other on a shared machine (two threads under load:
#: 2 MiB 1.24×, 16 MiB 0.91×).
CHUNK_BYTES = 8 * 2**20


class DiagonalSink:
    """Per parameter, the diagonal ``[numel]`` or the per-component rows ``[NS, numel]``.

    Args:
        params: The parameters, in the flattening order.
        NS: Samples with factor columns; ``C``: columns per sample.
        per_component: Keep one row per sample instead of their sum.
    """

    def __init__(
        self, params: list[Tensor], NS: int, C: int, per_component: bool
    ) -> None:
        self.params, self.NS, self.C = params, NS, C
        self.per_component = per_component
        lead = (NS,) if per_component else ()
        self.values = {
            id(p): torch.zeros(*lead, p.numel(), dtype=p.dtype, device=p.device)
            for p in params
        }

    def add_rows(
        self, p: Tensor, rows: Tensor, cols: slice | Tensor = slice(None)
    ) -> None:
        """Add the squares of ``rows`` ``[NS·C, k]`` (sample-major) at ``cols`` of ``p``."""
        squares = rows.square()
        target = self.values[id(p)]
        if self.per_component:  # sum the C columns of each sample only
            target[:, cols] += squares.reshape(self.NS, self.C, -1).sum(1)
        else:
            target[cols] += squares.sum(0)

    def result(self) -> list[Tensor]:
        """Per parameter ``[numel]`` (``[NS, numel]``), in ``params`` order."""
        return [self.values[id(p)] for p in self.params]


def _dense_one_position(
    sink: DiagonalSink, p: Tensor, operand: DenseOperand, g: Tensor
) -> None:
    """``(g²)ᵀ (a²)`` per group for ``P = 1``: ``g`` ``[NS, C, 1, O]``, ``A`` ``[NS, G, 1, I_g]``."""
    found = acc.balanced(operand.A, g, g.dtype)  # scale before squaring
    if found is None:  # a zero side: the block's diagonal vanishes
        return
    A, g = found
    NS, G = A.shape[:2]
    g2 = g[:, :, 0].square().sum(1).reshape(NS, G, operand.channels)  # [NS, G, O_g]
    a2 = A[:, :, 0].square()  # [NS, G, I_g]
    target = sink.values[id(p)]
    if sink.per_component:  # weight [G·O_g, I_g] flattens as (j, o, i)
        target += torch.einsum("njo,nji->njoi", g2, a2).reshape(NS, -1)
    else:
        target += torch.einsum("njo,nji->joi", g2, a2).reshape(-1)


def _dense_squares(
    sink: DiagonalSink, p: Tensor, operand: DenseOperand, g: Tensor, budget: int
) -> None:
    """``Σ_c (Σ_P g_{ncpo} a_{npi})²`` for ``g`` ``[NS, C, P, O]``, all groups at once.

    Per chunk of ``b`` samples (and, if one sample's block exceeds the chunk, ``o``
    output channels of every group) of at most :data:`CHUNK_BYTES` (or
    ``budget / 8``): per column ``c`` one ``bmm`` ``[b·G, o, P] @ [b·G, P, I_g]``
    whose squares are added to the chunk's sum in place, then the sum over the
    samples. ``g``'s ``[P, O]`` blocks enter the GEMM transposed, uncopied (for
    ``G = 1``), and no ``[NC, D_l]`` rows are laid out.
    """
    A = operand.A  # [NS, G, P, I_g], contiguous
    NS, C, P, _ = g.shape
    G, Ig, Og = operand.groups, A.shape[-1], operand.channels
    lead = (NS,) if sink.per_component else ()
    target = sink.values[id(p)].view(*lead, G, Og, Ig)
    per_row = G * Ig * g.element_size()  # one sample's block of one channel
    fit = max(1, min(CHUNK_BYTES, budget // 8) // per_row)
    o_step = min(Og, fit)
    n_step = max(1, fit // o_step)
    grouped = g.view(NS, C, P, G, Og)
    for o0 in range(0, Og, o_step):
        o1 = min(Og, o0 + o_step)
        for n0 in range(0, NS, n_step):
            n1 = min(NS, n0 + n_step)
            b, o = n1 - n0, o1 - o0
            right = A[n0:n1].reshape(b * G, P, Ig)
            squares = work = None
            for c in range(C):
                # [b, P, G, o] -> [b·G, o, P]: a transposed view when G = 1
                left = grouped[n0:n1, c, :, :, o0:o1].permute(0, 2, 3, 1)
                left = left.reshape(b * G, o, P)
                if squares is None:
                    squares = torch.bmm(left, right).square_()  # [b·G, o, I_g]
                    work = torch.empty_like(squares)
                    continue
                rows = torch.bmm(left, right, out=work)
                squares.addcmul_(rows, rows)
            if squares is None:  # C = 0
                return
            squares = squares.view(b, G, o, Ig)
            if sink.per_component:
                target[n0:n1, :, o0:o1] += squares
            else:
                target[:, o0:o1] += squares.sum(0)


def _whole_batch(lin: Linearization) -> bool:
    """Whether the factor columns belong to samples ``0, 1, …, N − 1`` in order."""
    index = lin.sample_index
    return index.numel() == lin.batch_size and bool((index[1:] > index[:-1]).all())


def _add_local(
    sink: DiagonalSink, la: Layer, f: Factors, budget: int
) -> LayerTreatment:
    """A per-sample layer, plus ``(B_p W)ᵀ`` under ``bn_split``; its treatment."""
    lin = f.lin
    NS, C = lin.num_samples, lin.num_columns_per_sample
    g = la.grad_matrix()  # [NC, P, O]
    NC, P, O = g.shape
    if la.bias is not None:
        extra = f.statistics_rows(la.bias)
        rows = g.sum(1)
        sink.add_rows(la.bias, rows if extra is None else rows + extra)
    if la.weight is None:
        return LayerTreatment.LOCAL_EXPLICIT
    B = f.B.get(id(la.weight)) if f.W is not None else None
    WT = f.coefficients_for(la.weight)  # [NC, ·]: the coefficients B meets
    operand = la.operand
    if not _whole_batch(lin):  # sub-sampled: the selected samples' operand (a copy)
        operand = operand.select(lin.sample_index)
    g = g.reshape(NS, C, P, O)
    plain = isinstance(operand, DenseOperand) and not operand.transposed
    if B is None and plain and operand.patches is None:
        if P == 1:
            _dense_one_position(sink, la.weight, operand, g)
            return LayerTreatment.KRONECKER
        _dense_squares(sink, la.weight, operand, g, budget)
        return LayerTreatment.LOCAL_EXPLICIT
    # chunks of rows [NC, cols]; every entry that B reaches lies in one (complete)
    for cols, rows in operand.explicit(g, budget // 4, complete=B is not None):
        if B is not None:
            rows.addmm_(WT, B[:, cols])  # V_p = V_{f,p} + (B_p W)ᵀ
        sink.add_rows(la.weight, rows, cols)
    return LayerTreatment.SPLIT if B is not None else LayerTreatment.LOCAL_EXPLICIT


def diagonal_from_factors(
    f: Factors, budget: int, per_component: bool, treatments: dict
) -> list[Tensor]:
    """Square and sum the rows of one strategy's checked factors (module docstring).

    Returns:
        Per parameter of ``f.lin.fmodel.params``: ``[numel]``, or ``[NS, numel]``
        with ``per_component``.
    """
    lin = f.lin
    params = list(lin.fmodel.params)
    sink = DiagonalSink(
        params, lin.num_samples, lin.num_columns_per_sample, per_component
    )
    shared: dict[int, Tensor] = {}
    for la in f.layers:
        if la.shared:  # explicit rows of every use, summed before squaring
            for p, rows in zip(la.params, layer_rows(la, f, budget)):
                if id(p) in la.shared:
                    shared[id(p)] = (
                        rows if id(p) not in shared else shared[id(p)] + rows
                    )
                    continue
                extra = f.statistics_rows(p)
                sink.add_rows(p, rows if extra is None else rows + extra)
            treatments[la.name] = LayerTreatment.SHARED
        elif not la.local:
            block = torch.cat(la.explicit)  # [NC, D_l]
            for p, part in zip(
                la.params, block.split([p.numel() for p in la.params], 1)
            ):
                sink.add_rows(p, part)
            treatments[la.name] = LayerTreatment.MIXING
        else:
            treatments[la.name] = _add_local(sink, la, f, budget)
        la.grads, la.explicit = [], []  # free as we go
    by_id = {id(p): p for p in params}
    for key, rows in shared.items():
        extra = f.statistics_rows(by_id[key])
        sink.add_rows(by_id[key], rows if extra is None else rows + extra)
    for bn in f.bns:
        for p, rows in zip(bn.params, bn.affine_rows()):
            extra = f.statistics_rows(p)
            sink.add_rows(p, rows if extra is None else rows + extra)
        if bn.params:
            treatments[bn.name] = LayerTreatment.SPLIT
    for p, rows in zip(f.generic, f.generic_rows):
        sink.add_rows(p, rows)
    for name, p in zip(lin.fmodel.names, params):
        if id(p) in f.owners:
            treatments[f.owners[id(p)]] = LayerTreatment.MIXING
        elif any(p is q for q in f.generic):
            treatments.setdefault(name, LayerTreatment.GENERIC)
    return sink.result()


def layerwise_diagonal(
    lin: Linearization,
    chunk: int,
    budget: int,
    per_component: bool = False,
    strategy: Strategy | None = None,
) -> tuple[list[Tensor], EngineReport]:
    """The diagonal (or per-component rows) from one run of the engine's strategies.

    One captured forward pass (none if the linearisation's capture is unused), the
    cost model's strategy (or ``strategy``), its backward passes and the self-check
    of a random ``V w`` against autograd, then :func:`diagonal_from_factors`.

    Returns:
        ``(values, report)``.

    Raises:
        LayerwiseUnavailable: The engine would stream (no per-layer factors), a
            layer turned out to mix samples, the factors exceeded ``budget`` or
            the self-check failed (:class:`SelfCheckFailed`); the caller then
            streams ``V`` in column blocks, which assumes nothing.
    """
    engine = _Engine(
        lin, chunk, budget, [list(lin.fmodel.params)], strategy, frozenset(), _no_tick
    )
    report = engine.report
    with torch.enable_grad():
        c = engine.forward()
        chosen = engine.plan(c)
        report.strategy = chosen
        if chosen is Strategy.STREAMED:
            raise LayerwiseUnavailable(report)
        try:
            f = engine.backward(c, chosen)
        except (LayerTurnedMixing, MemoryBudgetExceeded) as err:
            report.fallback = f"{chosen} stopped ({type(err).__name__}); streamed"
            raise LayerwiseUnavailable(report) from err
        bad = self_check(f, engine.cap.precision)
        if bad:
            report.fallback = f"{chosen} failed its self-check; streamed"
            raise SelfCheckFailed(report, bad)
    return diagonal_from_factors(f, budget, per_component, report.layers), report


__all__ = ["DiagonalSink", "diagonal_from_factors", "layerwise_diagonal"]
