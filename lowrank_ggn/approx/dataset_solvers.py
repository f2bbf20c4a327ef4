r"""The two solvers of the data-set GGN, on one process or many.

Rank ``r`` holds batches ``b ∈ B_r`` and their scaled factors ``√w_b V_b``; the
columns of ``Ṽ = [√w_1 V_1, …, √w_B V_B]`` are ordered rank by rank, batch by batch
(the single-process order when rank ``r`` holds the ``r``-th consecutive run of
batches). With ``Ṽ_r`` the columns of rank ``r``:

* **dense**: ``Ṽᵀ Ṽ = [Ṽ_rᵀ Ṽ_s]_{r,s}``. Rank ``s`` broadcasts its ``Ṽ_sᵀ``
  (``[Ñ_s, D]``) in turn; every rank forms its block-row ``Ṽ_rᵀ Ṽ`` (the diagonal
  block by ``syrk``: one triangle, half the flops); one all-reduce
  assembles the Gram on every rank; rank 0 diagonalises it and broadcasts the pairs;
  eigenvectors ``Ṽ u / √λ = Σ_r Ṽ_r u_r / √λ`` are all-reduced from each rank's part.
  Memory per rank: ``Ñ_r·D + max_s Ñ_s·D`` factors, ``Ñ²`` (twice on rank 0);
  bytes received: ``Σ_{s≠r} Ñ_s·D`` factors plus the ``Ñ²`` all-reduce.
* **lanczos**: ``Ṽᵀ Ṽ u``: each rank adds ``Σ_{b∈B_r} √w_b V_b u_b`` (one VJP per
  batch), one all-reduce of ``[K, D]``, then its own ``Ṽ_rᵀ x`` (one JVP per
  batch), placed in an ``[K, Ñ]`` all-reduce. Every rank runs the same ``eigsh``
  iteration on identical products, so all get the same pairs. With
  ``activations="recompute"`` a batch's forward pass is redone for every product
  instead of keeping its activations.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse.linalg import eigsh
from torch import Tensor, nn

from lowrank_ggn.approx.distributed import Comm
from lowrank_ggn.core.budget import MemoryBudgetExceeded
from lowrank_ggn.core.engine.accumulate import symmetric_rank_k_update
from lowrank_ggn.core.linearization import Linearization
from lowrank_ggn.core.options import GGNOptions
from lowrank_ggn.core.precision import ErrorModel, accumulation_dtype
from lowrank_ggn.core.spectrum import GramEigenpairs, gram_eigh, ritz_pairs
from lowrank_ggn.operators import TorchLinearOperator, factors_transpose_apply


class GramMemoryError(MemoryBudgetExceeded):
    """The data-set Gram matrix would exceed the memory budget of the dense solver."""


def dense_memory_bytes(
    num_columns: int, num_params: int, itemsize: int, acc_itemsize: int | None = None
) -> int:
    """``item · Ñ D + acc · 2 Ñ²``: the dense solver's memory estimate in bytes.

    The rows ``Ṽᵀ`` in the parameters' dtype, the Gram and its eigendecomposition in
    the accumulation dtype (``acc_itemsize``, default ``itemsize``).
    """
    acc = itemsize if acc_itemsize is None else acc_itemsize
    return itemsize * num_columns * num_params + 2 * acc * num_columns**2


def check_budget(
    columns: int, lin: Linearization, options: GGNOptions, when: str
) -> int:
    """Refuse a dense data-set Gram of ``columns`` rows above the memory budget.

    Returns:
        The estimate in bytes (:func:`dense_memory_bytes`).
    """
    fm, budget = lin.fmodel, options.memory_budget
    itemsize = torch.empty(0, dtype=fm.dtype).element_size()
    acc = accumulation_dtype(fm.dtype, options.accumulate).itemsize
    need = dense_memory_bytes(columns, fm.num_params, itemsize, acc)
    if need > budget:
        raise GramMemoryError(
            f"the data-set Gram matrix {when} has {columns} rows; the dense solver "
            f"needs about {need / 2**30:.3g} GiB ({columns}² Gram entries twice, "
            f"{acc} bytes each, plus {columns}×{fm.num_params} factors, {itemsize} "
            f"bytes each), above memory_budget={budget / 2**30:.3g} GiB. Pass "
            "solver='lanczos' with top_k=k for the k largest eigenvalues without "
            "forming it, use mc_samples=M (M columns per sample), subsampling=[...] "
            "or fewer/smaller batches, or raise memory_budget."
        )
    return need


def check_ranks(
    offsets: list[int], D: int, dtype: torch.dtype, options: GGNOptions
) -> None:
    """Per rank: own and one peer's factors ``(Ñ_r + max Ñ_s)·D``, the Gram ``2 Ñ²``."""
    item, budget = dtype.itemsize, options.memory_budget
    acc = accumulation_dtype(dtype, options.accumulate).itemsize
    cols = [b - a for a, b in zip(offsets, offsets[1:])]
    need = [item * (c + max(cols)) * D + 2 * acc * offsets[-1] ** 2 for c in cols]
    worst = max(range(len(need)), key=need.__getitem__)
    if need[worst] > budget:
        raise GramMemoryError(
            f"rank {worst} of the dense data-set solver needs about "
            f"{need[worst] / 2**30:.3g} GiB (its {cols[worst]} and a peer's "
            f"{max(cols)} factor rows of D={D}, and the {offsets[-1]}² Gram twice), "
            f"above memory_budget={budget / 2**30:.3g} GiB. Use solver='lanczos' "
            "with top_k=k, mc_samples=M, or more ranks/fewer batches per rank."
        )


def dense_pairs(
    Vt: Tensor,
    offsets: list[int],
    comm: Comm,
    acc: torch.dtype,
    rtol: float | None,
    top_k: int | None,
) -> GramEigenpairs:
    """Eigenpairs of the data-set Gram from every rank's ``Ṽ_rᵀ`` (see module docstring).

    Args:
        Vt: This rank's scaled factors ``[Ñ_r, D]``.
        offsets: First column of every rank, and ``Ñ`` last (``world + 1`` entries).
        comm: The process group.
        acc: dtype the Gram is summed and diagonalised in.
        rtol: ``None`` (error model) or a relative threshold.
        top_k: Keep at most this many.
    """
    total, D = offsets[-1], Vt.shape[1]
    gram = Vt.new_zeros(total, total, dtype=acc)
    mine = slice(offsets[comm.rank], offsets[comm.rank + 1])
    for s in range(comm.world):
        if s == comm.rank:
            other = comm.broadcast_(Vt.contiguous(), s)
        else:
            rows = offsets[s + 1] - offsets[s]
            other = comm.broadcast_(Vt.new_empty(rows, D), s)
        block = gram[mine, offsets[s] : offsets[s + 1]]
        if s == comm.rank:  # the diagonal block by syrk: one triangle, half the flops
            symmetric_rank_k_update(block, other)
            continue
        step = max(1, 2**24 // max(1, Vt.shape[0] + other.shape[0]))
        for j in range(0, D, step):  # cast in column blocks: no full copy in ``acc``
            block.addmm_(Vt[:, j : j + step].to(acc), other[:, j : j + step].to(acc).T)
        del other
    comm.all_reduce_(gram)
    gram = 0.5 * (gram + gram.T)
    payload = [None]
    if comm.rank == 0:
        model = ErrorModel.of(Vt.dtype, acc, D)
        pairs = gram_eigh(gram, model).select(rtol, top_k)
        payload = [_to_cpu(pairs)]
    (pairs,) = comm.broadcast_objects(payload, 0)
    return _to_device(pairs, Vt.device)


def dense_eigenvectors(
    Vt: Tensor, coefficients: Tensor, offsets: list[int], comm: Comm
) -> Tensor:
    """``(Ṽ c_k)ᵀ`` ``[K, D]`` from coefficient columns ``c`` ``[Ñ, K]``, all-reduced."""
    mine = coefficients[offsets[comm.rank] : offsets[comm.rank + 1]]
    return comm.all_reduce_(mine.T.to(Vt.dtype) @ Vt)


def _to_cpu(pairs: GramEigenpairs) -> GramEigenpairs:
    return _to_device(pairs, torch.device("cpu"))


def _to_device(pairs: GramEigenpairs, device: torch.device) -> GramEigenpairs:
    move = {
        name: getattr(pairs, name).to(device)
        for name in ("eigenvalues", "vectors", "errors")
    }
    diag = None if pairs.diag is None else pairs.diag.to(device)
    return GramEigenpairs(
        move["eigenvalues"],
        move["vectors"],
        move["errors"],
        pairs.threshold,
        pairs.num_unresolved,
        diag,
        pairs.lam_max,
        pairs.model,
    )


class DatasetOperator:
    """``Ṽᵀ Ṽ`` and ``Ṽ`` as products over this rank's batches (module docstring)."""

    def __init__(
        self,
        lins: list[Linearization],
        scales: list[float],
        offsets: list[int],
        comm: Comm,
        chunk: int,
        recompute: bool,
    ) -> None:
        self.lins, self.scales, self.comm = lins, scales, comm
        self.offsets, self.chunk, self.recompute = offsets, chunk, recompute
        self.sizes = [lin.num_columns for lin in lins]
        self.total = offsets[-1]

    def _free(self) -> None:
        if self.recompute:  # the next VJP redoes the forward pass
            for lin in self.lins:
                lin.release_graph()

    def apply_factors(self, coefficients: Tensor) -> Tensor:
        """``(Ṽ c_k)ᵀ`` ``[K, D]`` for rows ``c_k`` ``[K, Ñ]``, all-reduced."""
        mine = coefficients[
            :, self.offsets[self.comm.rank] : self.offsets[self.comm.rank + 1]
        ]
        parts = torch.split(mine, self.sizes, dim=1)
        fm = self.lins[0].fmodel
        x = coefficients.new_zeros(coefficients.shape[0], fm.num_params)
        for s, lin, u in zip(self.scales, self.lins, parts):
            x += s * lin.apply_factors(u, self.chunk)
        self._free()
        return self.comm.all_reduce_(x)

    def apply(self, rows: Tensor) -> Tensor:
        """``(Ṽᵀ Ṽ u_k)ᵀ`` for rows ``u_k`` ``[K, Ñ]``."""
        x = self.apply_factors(rows)
        out = rows.new_zeros(rows.shape[0], self.total)
        start = self.offsets[self.comm.rank]
        for s, lin in zip(self.scales, self.lins):
            stop = start + lin.num_columns
            out[:, start:stop] = s * factors_transpose_apply(lin, x, self.chunk)
            start = stop
        return self.comm.all_reduce_(out)


def lanczos_pairs(
    model: nn.Module,
    op: DatasetOperator,
    top_k: int,
    rtol: float,
) -> GramEigenpairs:
    """Top-``k`` eigenpairs of ``Ṽᵀ Ṽ`` by ``eigsh`` on the operator (same on every rank)."""
    if top_k >= op.total:
        raise ValueError(
            f"top_k={top_k} must be smaller than the Gram size {op.total} for "
            "solver='lanczos'; use solver='dense' for the whole spectrum."
        )
    fm = op.lins[0].fmodel
    linear = TorchLinearOperator(model, op.total, op.apply, fm.dtype, fm.device)
    v0 = np.random.default_rng(0).standard_normal(op.total)  # reproducible start
    evals, evecs = eigsh(linear, k=top_k, which="LA", v0=v0)
    order = np.argsort(evals)[::-1].copy()
    to = {"dtype": fm.dtype, "device": fm.device}
    evals = torch.as_tensor(evals[order]).to(**to)
    evecs = torch.as_tensor(evecs[:, order]).to(**to)
    model_errors = ErrorModel.of(evals.dtype, evals.dtype, fm.num_params)
    # eigsh reports no residuals: the operator's round-off alone
    return ritz_pairs(evals, evecs, torch.zeros_like(evals), rtol, top_k, model_errors)


__all__ = [
    "DatasetOperator",
    "GramMemoryError",
    "check_budget",
    "check_ranks",
    "dense_memory_bytes",
    "dense_eigenvectors",
    "dense_pairs",
    "lanczos_pairs",
]
