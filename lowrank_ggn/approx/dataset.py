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

* ``solver="dense"``: every batch's rows ``Vᵀ_b`` (``[N_b·C, D]``) are kept, then
  ``Ṽᵀ Ṽ`` (summed in the accumulation dtype, float64 for float32 models) and
  ``eigh``. The rows come from the layer-wise engine of one batch
  (:func:`~lowrank_ggn.core.engine.rows.layerwise_rows`: captured forward pass,
  the cost model's or the forced ``strategy``, self-check): ``C`` batch backward
  passes on the per-sample path and under ``bn_split`` (plus its ``2K`` statistics
  directions), then each layer's rows from its operand by one GEMM per chunk;
  ``columns`` takes ``N·C`` full-batch passes; ``streamed``, ``generic`` and a
  failed self-check take one vmapped backward pass per column block
  (:meth:`~lowrank_ggn.core.linearization.Linearization.factors_matrix`, the only
  route before the engine: vmapped per-sample passes, or ``N·C`` full-batch passes
  for train-mode BatchNorm). Memory ``item · Ñ D + acc · 2 Ñ²`` bytes (all
  rows; the Gram and its eigendecomposition in the accumulation dtype), and the
  engine's blocks of one batch within what is left; time ``O(Ñ² D + Ñ³)`` plus the
  backward passes. The estimate is checked against ``memory_budget`` (default
  4 GiB) *before* each batch's rows are allocated (and, for a list of batches, for
  the whole data set after the first batch), and the call fails with
  :class:`GramMemoryError` stating the size.
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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lowrank_ggn.approx.dataset_batches import (
    Collected,
    check_batches,
    collect,
    handshake,
    read_batches,
    stack_scaled,
)
from lowrank_ggn.approx.dataset_solvers import (
    DatasetOperator,
    check_ranks,
    dense_eigenvectors,
    dense_pairs,
    lanczos_pairs,
)
from lowrank_ggn.approx.distributed import Comm, check_sync_batch_norm
from lowrank_ggn.core.engine.report import EngineReport
from lowrank_ggn.core.losses.registry import check_loss_func, resolve_loss
from lowrank_ggn.core.modes import Solver
from lowrank_ggn.core.options import DEFAULT_CHUNK, GGNOptions
from lowrank_ggn.core.outputs import OutputSpec
from lowrank_ggn.core.paths import EnginePath
from lowrank_ggn.core.precision import accumulation_dtype
from lowrank_ggn.core.solvers import check_solver
from lowrank_ggn.core.spectrum import GramEigenpairs, default_rtol, drop_unresolved
from lowrank_ggn.core.state import model_preserved
from lowrank_ggn.core.validation import check_model, check_options

#: The data-set solvers (no ``"auto"``: its cost model needs one batch's engine).
SOLVERS = (Solver.DENSE, Solver.LANCZOS)


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
        bytes_exchanged: Bytes this rank sent or received in collectives (0 for
            one process).
        engine_reports: Per batch (all ranks, in order) how its rows were found
            (:class:`~lowrank_ggn.core.engine.EngineReport`: ``strategy``,
            ``fallback``, per-layer treatments); ``None`` per batch for Lanczos.

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
    bytes_exchanged: int = 0
    engine_reports: list[EngineReport | None] = field(default_factory=list)

    @property
    def rank(self) -> int:
        """Number of returned eigenvalues."""
        return self.eigenvalues.numel()


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
    process_group: object | None = None,
    activations: str = "keep",
    output: OutputSpec = None,
    timeout: float | None = None,
    strategy: str | None = None,
    accumulate: str | None = None,
    subsampling: Sequence[int] | Tensor | None = None,
    options: GGNOptions | None = None,
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
        chunk: Columns (rows) per batched backward pass.
        path: ``None`` (automatic), ``"per_sample"`` or ``"full_batch"``.
        mc_samples: Monte-Carlo factors with ``M`` columns per sample, drawn batch by
            batch from ``generator``.
        generator: ``torch.Generator`` for the Monte-Carlo draws: one seed ``s`` is
            drawn from it, and batch ``b`` (global index, rank order) draws from a
            generator seeded ``s + b``, so the result does not depend on how the
            batches are split across ranks.
        solver: ``"dense"`` (exact, full Gram, memory-guarded) or ``"lanczos"``
            (top-``k`` by ``eigsh``, matrix-free).
        memory_budget: Budget of the dense solver in bytes; ``None``: the
            environment variable ``LOWRANK_GGN_MEMORY_BUDGET`` or 4 GiB.
        progress: Show a tqdm progress bar on stderr (``None``: for a sized iterable
            of at least ``PROGRESS_MIN_BATCHES`` batches, when tqdm is installed).
        process_group: A ``torch.distributed`` process group (``None``: one
            process). Every rank passes its own batches and gets the spectrum over
            the union of all ranks' batches, in rank order, eigenvectors included
            (:mod:`lowrank_ggn.approx.dataset_solvers`). Every rank must pass the
            same model, options and (identically seeded) ``generator``.
        activations: ``"keep"`` every batch's forward activations for the Lanczos
            products, or ``"recompute"`` them for every product (memory of one
            batch's activations; one more forward pass per batch and product).
        output: Which tensor of the model's return value the loss takes
            (:mod:`lowrank_ggn.core.outputs`).
        timeout: Seconds any one collective wait may last before :class:`RankFailed`
            names the rank that did not answer (``None``: the process group's own
            timeout, 30 min for gloo unless set; :mod:`lowrank_ggn.approx.distributed`).
            It must exceed the longest one rank lags behind another (its extra batches).
        strategy: The engine's strategy for every batch's rows ``Vᵀ_b`` (dense
            solver): ``None`` (the cost model, per batch), ``"per_sample"``,
            ``"bn_split"``, ``"columns"``, ``"streamed"`` or ``"generic"`` (as for
            :class:`~lowrank_ggn.GGN`; the last two: rows from vmapped backward
            passes). The result's ``engine_reports`` say what each batch took.
        accumulate: Where the data-set Gram is summed (dense solver): ``None``
            (float64 for float32 models), ``"float64"`` or ``"native"``
            (:mod:`lowrank_ggn.core.precision`).
        subsampling: Batch positions ``S`` whose curvature every batch keeps, the
            forward pass on the whole batch, as for :class:`~lowrank_ggn.GGN`
            (:mod:`lowrank_ggn.core.subsampling`): batch ``b`` adds
            ``w_b G_{S,b}`` with ``G_{S,b} = κ_b J_Sᵀ H_SS J_S``, ``κ_b = N_b/|S|``
            (``'mean'``) and ``w_b`` unchanged, an unbiased estimate of ``G`` for
            shuffled batches; ``Ñ = B·|S|·C``. Every batch needs more than
            ``max(S)`` samples.
        options: Instead of ``chunk``, ``path``, ``mc_samples``, ``generator``,
            ``memory_budget``, ``progress``, ``output``, ``strategy`` and
            ``accumulate``, a :class:`~lowrank_ggn.GGNOptions` (the same object as
            for a batch's :class:`~lowrank_ggn.GGN`); giving both is an error. The
            Lanczos solver uses ``chunk``, ``path``, ``mc_samples``, ``generator``,
            ``memory_budget`` (each batch's ``S``), ``progress`` and ``output``; its
            products (one VJP and one JVP per batch, in the parameters' dtype) need
            no ``strategy`` or ``accumulate``.

    Returns:
        A :class:`DatasetSpectrum`.

    Raises:
        GramMemoryError: When the dense solver would exceed ``memory_budget``.
        RankFailed: When another rank fails, disagrees, dies or does not answer.

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
    options = GGNOptions.given(
        options,
        path=path,
        chunk=chunk,
        mc_samples=mc_samples,
        generator=generator,
        memory_budget=memory_budget,
        progress=progress,
        output=output,
        strategy=strategy,
        accumulate=accumulate,
    )
    chosen = _validate(model, loss_func, batches, top_k, eigenvectors, rtol, solver)
    if activations not in ("keep", "recompute"):
        raise ValueError(
            f"activations must be 'keep' or 'recompute'; got {activations!r}."
        )
    if params is not None and not isinstance(params, (Tensor, dict, list, tuple)):
        params = list(params)  # read twice below (a generator only once)
    comm = Comm(process_group, timeout)
    comm.handshake(  # before any data collective: the same call on every rank
        handshake(
            model,
            loss_func,
            params,
            options,
            top_k=top_k,
            eigenvectors=eigenvectors,
            rtol=rtol,
            path=None if options.path is None else options.path.value,
            solver=solver,
            activations=activations,
            subsampling=_positions(subsampling),
        )
    )
    batches, first = read_batches(batches, comm)
    loss_func = resolve_loss(loss_func)  # one wrapper: its reduction is shared
    with model_preserved(model):
        got = collect(
            model, loss_func, batches, params, options, chosen, comm, first, subsampling
        )
        if chosen is Solver.LANCZOS:
            op = DatasetOperator(
                got.lins,
                got.scales,
                got.offsets,
                comm,
                chunk,
                activations == "recompute",
            )
            dtype = got.lins[0].outputs.dtype
            rtol = default_rtol(got.offsets[-1], dtype) if rtol is None else rtol
            pairs = lanczos_pairs(model, op, top_k, rtol)
            dtype = pairs.eigenvalues.dtype
            apply, Vt = op.apply_factors, None
        else:
            dtype = got.blocks[0].dtype
            if comm.distributed:
                check_ranks(got.offsets, got.blocks[0].shape[1], dtype, options)
            Vt = stack_scaled(got.blocks, got.scales)  # [Ñ_r, D], the blocks freed
            acc = accumulation_dtype(dtype, options.accumulate)
            pairs = dense_pairs(Vt, got.offsets, comm, acc, rtol, top_k)
            apply = None
        return _result(pairs, got, dtype, eigenvectors, apply, Vt, comm, chosen)


def _validate(
    model: nn.Module,
    loss_func: nn.Module,
    batches: object,
    top_k: int | None,
    eigenvectors: object,
    rtol: float | None,
    solver: str,
) -> Solver:
    """The checks that need no batch: model, loss, solver and the spectrum's options."""
    check_model(model)
    check_loss_func(loss_func)
    check_sync_batch_norm(model)
    check_options(rtol=rtol, top_k=top_k)
    if not isinstance(eigenvectors, bool):
        raise TypeError(
            f"eigenvectors must be True or False; got {eigenvectors!r}. (Take the "
            "top k of the result's eigenvectors.)"
        )
    chosen = check_solver(solver, top_k, allowed=SOLVERS)
    check_batches(batches)
    return chosen


def _result(
    pairs: GramEigenpairs,
    got: Collected,
    dtype: torch.dtype,
    eigenvectors: bool,
    apply,
    Vt: Tensor | None,
    comm: Comm,
    solver: Solver,
) -> DatasetSpectrum:
    """The :class:`DatasetSpectrum`, parameter-space eigenvectors formed if asked."""
    vectors = None
    if eigenvectors:
        pairs = drop_unresolved(pairs)
        coefficients = pairs.scaled_vectors()  # [Ñ, K]
        if apply is not None:
            vectors = apply(coefficients.T.to(dtype))
        else:
            vectors = dense_eigenvectors(Vt, coefficients, got.offsets, comm)
    return DatasetSpectrum(
        pairs.eigenvalues.to(dtype),
        vectors,
        [entry[2] for entry in got.flat],
        [entry[0] for entry in got.flat],
        got.weights,
        got.offsets[-1],
        pairs.threshold,
        pairs.vectors.to(dtype),
        solver.value,
        pairs.errors.to(dtype) if solver is Solver.DENSE else None,
        bytes_exchanged=comm.bytes,
        engine_reports=[entry[3] for entry in got.flat],
    )


def _positions(subsampling: object) -> object:
    """What the handshake compares of ``subsampling``: the same text on every rank."""
    if isinstance(subsampling, Tensor):
        return repr(subsampling.tolist())
    return None if subsampling is None else repr(subsampling)
