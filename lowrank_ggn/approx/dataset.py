r"""The GGN of a whole data set, from many batches: one Gram over all their columns.

For batches ``b = 1, …, B`` with ``N_b`` samples each (uneven sizes allowed), every
batch runs its own forward pass (so train-mode BatchNorm uses that batch's
statistics, as in training) and has its own GGN ``G_b = V_b V_bᵀ``. The data-set GGN

.. math::
    G = \sum_b w_b G_b = \tilde V \tilde V^⊤, \qquad
    \tilde V = [\sqrt{w_1} V_1, …, \sqrt{w_B} V_B], \qquad
    w_b = \begin{cases} N_b / \sum_{b'} N_{b'} & \text{'mean'} \\ 1 & \text{'sum'}
    \end{cases}

(the mean over all samples for ``'mean'``: ``G_b`` already carries ``1/N_b``) has the
nonzero eigenvalues of the Gram matrix ``Ṽᵀ Ṽ`` over *all* columns, cross-batch
blocks ``√(w_a w_b) V_aᵀ V_b`` included. ``Ñ = Σ_b N_b·C`` is its size.

Two solvers:

* ``solver="dense"``: ``Vᵀ_b`` (``[N_b·C, D]``, one backward pass per column block,
  :meth:`~lowrank_ggn.core.linearization.Linearization.factors_matrix`) is kept for every batch,
  then ``Ṽᵀ Ṽ`` and ``eigh``. Memory ``itemsize · (2 Ñ² + Ñ D)`` bytes (Gram, its
  eigendecomposition, all factors); time ``O(Ñ² D + Ñ³)`` plus the backward passes.
  This estimate is checked against ``memory_budget`` (default 4 GiB) *before* each
  batch's factors are allocated (and, for a list of batches, for the whole data set
  after the first batch), and the call fails with :class:`GramMemoryError` stating
  the size.
* ``solver="lanczos"`` with ``top_k=k``: ``scipy.sparse.linalg.eigsh`` on the Gram as
  a linear operator, ``Ṽᵀ Ṽ u = Ṽᵀ (Ṽ u)``, never formed: ``Ṽ u`` is one
  vector-Jacobian product per batch and ``Ṽᵀ x`` one Jacobian-vector product per
  batch. Memory: every batch's inputs, factors and saved forward activations plus
  ``O(Ñ + D)``; time: two passes over all batches per Lanczos iteration (typically
  a few times ``k`` iterations). Returns only the ``k`` largest eigenvalues.

The iterable of batches is consumed exactly once (a generator is fine). Reference:
https://arxiv.org/abs/2106.02624.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.linalg import eigsh
from torch import Tensor, nn

from lowrank_ggn.approx.param_groups import symmetric_gram
from lowrank_ggn.core.budget import resolve_memory_budget
from lowrank_ggn.core.linearization import DEFAULT_CHUNK, Linearization, linearize
from lowrank_ggn.core.loss_factors import check_loss_func, check_mc_samples
from lowrank_ggn.core.paths import EnginePath
from lowrank_ggn.core.precision import ErrorModel, accumulation_dtype
from lowrank_ggn.core.spectrum import (
    default_rtol,
    drop_unresolved,
    select_pairs,
    spectrum_from_gram,
)
from lowrank_ggn.core.state import model_preserved
from lowrank_ggn.core.validation import check_model, check_options
from lowrank_ggn.operators import TorchLinearOperator, factors_transpose_apply

#: With ``progress=None``, a progress bar is shown for at least this many batches.
PROGRESS_MIN_BATCHES = 20

SOLVERS = ("dense", "lanczos")


class GramMemoryError(MemoryError):
    """The data-set Gram matrix would exceed the memory budget of the dense solver."""


@dataclass
class DatasetSpectrum:
    """Result of :func:`ggn_spectrum_dataset`.

    Attributes:
        eigenvalues: ``[K]``, descending: those the error model resolves (dense
            solver), or above ``Ñ · eps · λ_max`` (Lanczos); or above ``rtol · λ_max``.
        eigenvectors: ``[K, D]`` orthonormal rows (parameters flattened in ``params``
            order), or ``None``.
        paths: The engine path of every batch.
        batch_sizes: ``N_b`` per batch.
        weights: ``w_b`` per batch.
        num_columns: ``Ñ = Σ_b N_b·C``, the size of the data-set Gram matrix.
        threshold: The absolute zero threshold applied.
        gram_eigenvectors: ``[Ñ, K]``, batch-major, then sample-major within a batch.
        solver: ``"dense"`` or ``"lanczos"``.
        eigenvalue_errors: ``[K]`` error estimates of the dense solver (the Gram is
            summed in float64 for float32 models; :mod:`lowrank_ggn.core.precision`);
            ``None`` for Lanczos, whose zero threshold is the rank rule ``Ñ · eps``.

    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    paths: list[EnginePath]
    batch_sizes: list[int]
    weights: list[float]
    num_columns: int
    threshold: float
    gram_eigenvectors: Tensor
    solver: str
    eigenvalue_errors: Tensor | None = None

    @property
    def rank(self) -> int:
        """Number of returned eigenvalues."""
        return self.eigenvalues.numel()


def dense_memory_bytes(num_columns: int, num_params: int, itemsize: int) -> int:
    """``itemsize · (2 Ñ² + Ñ D)``: the dense solver's memory estimate in bytes."""
    return itemsize * (2 * num_columns**2 + num_columns * num_params)


def _progress(batches: Iterable, progress: bool | None) -> Iterable:
    total = len(batches) if isinstance(batches, Sized) else None
    show = progress if progress is not None else (total or 0) >= PROGRESS_MIN_BATCHES
    if not show:
        return batches
    try:
        from tqdm.auto import tqdm
    except ImportError:  # optional dependency
        return batches
    return tqdm(batches, total=total, file=sys.stderr, desc="GGN batches", unit="batch")


def _unpack(item: object, b: int) -> tuple[Tensor, Tensor]:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise TypeError(
            f"batches[{b}] must be a pair (inputs, targets); got {type(item).__name__}"
            f"{f' of length {len(item)}' if isinstance(item, (tuple, list)) else ''}."
        )
    return item[0], item[1]


def _projected_columns(batches: Iterable, lin: Linearization) -> int | None:
    """Total columns of a list of batches, from the first batch's columns per sample."""
    if not isinstance(batches, Sequence):
        return None
    per_sample = lin.num_columns // lin.num_samples
    try:
        return per_sample * sum(int(item[0].shape[0]) for item in batches)
    except (TypeError, AttributeError, IndexError):
        return None


def _check_budget(columns: int, lin: Linearization, budget: float, when: str) -> None:
    fm = lin.fmodel
    itemsize = torch.empty(0, dtype=fm.dtype).element_size()
    need = dense_memory_bytes(columns, fm.num_params, itemsize)
    if need > budget:
        raise GramMemoryError(
            f"the data-set Gram matrix {when} has {columns} rows; the dense solver "
            f"needs about {need / 2**30:.3g} GiB ({columns}² Gram entries twice plus "
            f"{columns}×{fm.num_params} factors, {itemsize} bytes each), above "
            f"memory_budget={budget / 2**30:.3g} GiB. Pass solver='lanczos' with "
            "top_k=k for the k largest eigenvalues without forming it, use "
            "mc_samples=M (M columns per sample) or fewer/smaller batches, or raise "
            "memory_budget."
        )


def _lanczos(
    model: nn.Module,
    lins: list[Linearization],
    scales: list[float],
    top_k: int,
    chunk: int,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` eigenpairs of ``Ṽᵀ Ṽ`` by ``eigsh`` on a matrix-free operator."""
    sizes = [lin.num_columns for lin in lins]
    total = sum(sizes)
    if top_k >= total:
        raise ValueError(
            f"top_k={top_k} must be smaller than the Gram size {total} for "
            "solver='lanczos'; use solver='dense' for the whole spectrum."
        )

    def apply(rows: Tensor) -> Tensor:
        # Ṽ u = Σ_b √w_b V_b u_b: one VJP per batch; then Ṽᵀ x per batch: one JVP
        parts = torch.split(rows, sizes, dim=1)
        x = sum(
            s * lin.apply_factors(u, chunk) for s, lin, u in zip(scales, lins, parts)
        )
        return torch.cat(
            [
                s * factors_transpose_apply(lin, x, chunk)
                for s, lin in zip(scales, lins)
            ],
            dim=1,
        )

    fm = lins[0].fmodel
    op = TorchLinearOperator(model, total, apply, fm.dtype, fm.device)
    v0 = np.random.default_rng(0).standard_normal(total)  # reproducible start
    evals, evecs = eigsh(op, k=top_k, which="LA", v0=v0)
    order = np.argsort(evals)[::-1].copy()
    to = {"dtype": fm.dtype, "device": fm.device}
    return torch.as_tensor(evals[order]).to(**to), torch.as_tensor(evecs[:, order]).to(
        **to
    )


def ggn_spectrum_dataset(
    model: nn.Module,
    loss_func: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    params: Sequence[Tensor] | None = None,
    top_k: int | None = None,
    eigenvectors: bool = False,
    rtol: float | None = None,
    chunk: int = DEFAULT_CHUNK,
    path: str | None = None,
    mc_samples: int | None = None,
    generator: torch.Generator | None = None,
    solver: str = "dense",
    memory_budget: float | None = None,
    progress: bool | None = None,
) -> DatasetSpectrum:
    r"""Nonzero spectrum of the data-set GGN ``Σ_b w_b G_b`` over many batches.

    See the module docstring for the math, the weights ``w_b`` and the two solvers.

    Args:
        model: The module; never changed.
        loss_func: A supported loss; its reduction sets ``w_b``.
        batches: Iterable of ``(inputs, targets)`` pairs, consumed once; sizes may
            differ (every batch of a train-mode BatchNorm model needs ``N_b ≥ 2``).
        params: Parameters; default: those that require grad.
        top_k: Return only the ``top_k`` largest eigenvalues (required for
            ``solver="lanczos"``).
        eigenvectors: Also return parameter-space eigenvectors ``[K, D]``.
        rtol: Relative zero threshold (default: the error model of
            :mod:`lowrank_ggn.core.precision` for the dense solver, ``Ñ · eps`` for
            Lanczos).
        chunk: Columns per vmapped backward pass.
        path: ``None`` (automatic), ``"per_sample"`` or ``"full_batch"``.
        mc_samples: Monte-Carlo factors with ``M`` columns per sample, drawn batch by
            batch from ``generator``.
        generator: ``torch.Generator`` for the Monte-Carlo draws.
        solver: ``"dense"`` (exact, full Gram, memory-guarded) or ``"lanczos"``
            (top-``k`` by ``eigsh``, matrix-free).
        memory_budget: Budget of the dense solver in bytes; ``None``: the
            environment variable ``LOWRANK_GGN_MEMORY_BUDGET`` or 4 GiB.
        progress: Show a tqdm progress bar on stderr (``None``: for a sized iterable
            of at least ``PROGRESS_MIN_BATCHES`` batches, when tqdm is installed).

    Returns:
        A :class:`DatasetSpectrum`.

    Raises:
        GramMemoryError: When the dense solver would exceed ``memory_budget``.

    Example:
        >>> import torch
        >>> from lowrank_ggn.reference import dense_ggn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
        ...                             torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> loss = torch.nn.CrossEntropyLoss()
        >>> X, y = torch.randn(9, 3, dtype=torch.float64), torch.randint(0, 2, (9,))
        >>> res = ggn_spectrum_dataset(model, loss, [(X[:5], y[:5]), (X[5:], y[5:])])
        >>> G = 5 / 9 * dense_ggn(model, loss, X[:5], y[:5]) + 4 / 9 * dense_ggn(
        ...     model, loss, X[5:], y[5:])
        >>> assert torch.allclose(res.eigenvalues.sum(), G.trace())

    """
    check_model(model)
    check_loss_func(loss_func)
    check_mc_samples(mc_samples, generator)
    check_options(chunk=chunk, rtol=rtol, top_k=top_k, memory_budget=memory_budget)
    if not isinstance(eigenvectors, bool):
        raise TypeError(
            f"eigenvectors must be True or False; got {eigenvectors!r}. (Take the "
            "top k of the result's eigenvectors.)"
        )
    budget = resolve_memory_budget(memory_budget)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}.")
    if solver == "lanczos" and top_k is None:
        raise ValueError(
            "solver='lanczos' finds the top_k largest eigenvalues; pass top_k=k."
        )
    if (
        isinstance(batches, tuple)
        and len(batches) == 2
        and isinstance(batches[0], Tensor)
    ):
        raise TypeError(
            "batches must be an iterable of (inputs, targets) pairs; for one batch "
            "pass [(inputs, targets)]."
        )
    with model_preserved(model):
        lins: list[Linearization] = []
        blocks: list[Tensor] = []
        sizes: list[int] = []
        paths: list[EnginePath] = []
        columns: list[int] = []
        for b, item in enumerate(_progress(batches, progress)):
            X, y = _unpack(item, b)
            lin = linearize(
                model,
                loss_func,
                X,
                y,
                params,
                path,
                mc_samples=mc_samples,
                generator=generator,
            )
            sizes.append(lin.batch_size)
            paths.append(lin.path)
            columns.append(lin.num_columns)
            if solver == "lanczos":
                lins.append(lin)
                continue
            if b == 0:
                projected = _projected_columns(batches, lin)
                if projected is not None:
                    _check_budget(projected, lin, budget, "of this data set")
            _check_budget(sum(columns), lin, budget, f"after {b + 1} batches")
            blocks.append(lin.factors_matrix(chunk))  # [N_b·C, D]
        if not sizes:
            raise ValueError("batches is empty; pass at least one (inputs, targets).")
        total = sum(sizes)
        weights = [n / total if loss_func.reduction == "mean" else 1.0 for n in sizes]
        scales = [w**0.5 for w in weights]
        if solver == "lanczos":
            evals, evecs = _lanczos(model, lins, scales, top_k, chunk)
            rtol = default_rtol(sum(columns), evals.dtype) if rtol is None else rtol
            model_errors = ErrorModel.of(
                evals.dtype, evals.dtype, lins[0].fmodel.num_params
            )
            lam_max = max(evals[0].item(), 0.0)
            errors = model_errors.operator_errors(torch.zeros_like(evals), lam_max)
            pairs = select_pairs(evals, evecs, errors, rtol, top_k, None, model_errors)
            vectors = None
            if eigenvectors:
                pairs = drop_unresolved(pairs)
                parts = torch.split(pairs.scaled_vectors().T, columns, dim=1)
                vectors = sum(
                    s * lin.apply_factors(u, chunk)
                    for s, lin, u in zip(scales, lins, parts)
                )
                if not pairs.eigenvalues.numel():
                    vectors = evals.new_zeros(0, lins[0].fmodel.num_params)
            dtype = evals.dtype
        else:
            Vt = torch.cat([s * block for s, block in zip(scales, blocks)])  # [Ñ, D]
            acc = accumulation_dtype(Vt.dtype, None)
            pairs = spectrum_from_gram(
                symmetric_gram(Vt, acc),
                top_k,
                rtol,
                ErrorModel.of(Vt.dtype, acc, Vt.shape[1]),
            )
            vectors = None
            if eigenvectors:
                pairs = drop_unresolved(pairs)
                vectors = pairs.scaled_vectors().T.to(Vt.dtype) @ Vt
            dtype = Vt.dtype
        evals, evecs = pairs.eigenvalues.to(dtype), pairs.vectors.to(dtype)
        threshold = pairs.threshold
        errors = pairs.errors.to(dtype) if solver == "dense" else None
        return DatasetSpectrum(
            evals,
            vectors,
            paths,
            sizes,
            weights,
            sum(columns),
            threshold,
            evecs,
            solver,
            errors,
        )
