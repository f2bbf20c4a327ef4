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

import torch
from torch import Tensor, nn

from lowrank_ggn.approx.dataset_solvers import (
    DatasetOperator,
    check_budget,
    check_ranks,
    dense_eigenvectors,
    dense_pairs,
    lanczos_pairs,
)
from lowrank_ggn.approx.distributed import Comm, check_sync_batch_norm
from lowrank_ggn.core.budget import resolve_memory_budget
from lowrank_ggn.core.linearization import DEFAULT_CHUNK, Linearization, linearize
from lowrank_ggn.core.loss_registry import check_loss_func, resolve_loss
from lowrank_ggn.core.loss_sampling import check_mc_samples
from lowrank_ggn.core.outputs import OutputSpec, check_output
from lowrank_ggn.core.paths import EnginePath
from lowrank_ggn.core.precision import accumulation_dtype
from lowrank_ggn.core.spectrum import (
    default_rtol,
    drop_unresolved,
)
from lowrank_ggn.core.state import fingerprint, model_preserved
from lowrank_ggn.core.validation import check_model, check_options

#: With ``progress=None``, a progress bar is shown for at least this many batches.
PROGRESS_MIN_BATCHES = 20

SOLVERS = ("dense", "lanczos")


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

    @property
    def rank(self) -> int:
        """Number of returned eigenvalues."""
        return self.eigenvalues.numel()


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


def _stable_name(obj: object) -> object:
    """What a handshake compares of a callable: the same text on every rank."""
    if obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, nn.Module):
        return type(obj).__name__
    return getattr(obj, "__qualname__", type(obj).__name__)


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
    check_model(model)
    check_loss_func(loss_func)
    check_sync_batch_norm(model)
    check_mc_samples(mc_samples, generator)
    check_output(output)
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
    if activations not in ("keep", "recompute"):
        raise ValueError(
            f"activations must be 'keep' or 'recompute'; got {activations!r}."
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
    if params is not None and not isinstance(params, (Tensor, dict, list, tuple)):
        params = list(params)  # read twice below (a generator only once)
    comm = Comm(process_group, timeout)
    comm.handshake(  # before any data collective: the same call on every rank
        {
            "parameters": [
                (n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()
            ],
            "values": [entry[4] for entry in fingerprint(model)],
            "options": {
                "params": None if params is None else repr(
                    [tuple(getattr(p, "shape", ())) for p in params]
                    if isinstance(params, (list, tuple))
                    else type(params).__name__
                ),
                "top_k": top_k,
                "eigenvectors": eigenvectors,
                "rtol": rtol,
                "chunk": chunk,
                "path": path,
                "mc_samples": mc_samples,
                "solver": solver,
                "memory_budget": budget,
                "activations": activations,
                "output": _stable_name(output),
            },
            "loss": (_stable_name(loss_func), getattr(loss_func, "reduction", None)),
        }
    )
    if comm.distributed:  # every rank's count first: global batch indices
        failure = None
        try:  # inside the agreement: a rank's failing iterator stops every rank
            batches = list(batches)
        except Exception as err:  # noqa: BLE001 - re-raised by comm.agree
            failure, batches = err, []
        comm.agree(failure, "the agreement after reading the batches")
    first = (
        sum(comm.gather_objects(len(batches))[: comm.rank]) if comm.distributed else 0
    )
    base_seed = None
    if mc_samples is not None:  # batch b draws from its own generator (any split)
        base_seed = int(torch.randint(2**62, (1,), generator=generator).item())
    loss_func = resolve_loss(loss_func)  # one wrapper: its reduction is shared
    with model_preserved(model):
        lins: list[Linearization] = []
        blocks: list[Tensor] = []
        local: list[tuple[int, int, EnginePath]] = []  # (N_b, columns, path)
        error = None
        try:
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
                    generator=_batch_generator(generator, base_seed, first + b),
                    capture=False,
                    output=output,
                )
                local.append((lin.batch_size, lin.num_columns, lin.path))
                if solver == "lanczos":
                    lins.append(lin)
                    continue
                if b == 0 and not comm.distributed:
                    projected = _projected_columns(batches, lin)
                    if projected is not None:
                        check_budget(projected, lin, budget, "of this data set")
                columns_so_far = sum(c for _, c, _ in local)
                check_budget(columns_so_far, lin, budget, f"after {b + 1} batches")
                blocks.append(lin.factors_matrix(chunk))  # [N_b·C, D]
            if not local:
                raise ValueError(
                    "batches is empty; pass at least one (inputs, targets)"
                    + (
                        f" on every rank (rank {comm.rank} has none)."
                        if comm.distributed
                        else "."
                    )
                )
        except Exception as err:  # noqa: BLE001 - raised on every rank by agree
            error = err
        comm.agree(error, "the agreement after every batch's factors")
        everyone = comm.gather_objects(local)
        flat = [entry for rank in everyone for entry in rank]
        sizes = [n for n, _, _ in flat]
        total = sum(sizes)
        weights = [n / total if loss_func.reduction == "mean" else 1.0 for n in sizes]
        offsets = [0]
        for rank_entries in everyone:
            offsets.append(offsets[-1] + sum(c for _, c, _ in rank_entries))
        start = sum(len(entries) for entries in everyone[: comm.rank])
        scales = [w**0.5 for w in weights[start : start + len(local)]]
        if solver == "lanczos":
            op = DatasetOperator(
                lins, scales, offsets, comm, chunk, activations == "recompute"
            )
            rtol = (
                default_rtol(offsets[-1], lins[0].outputs.dtype)
                if rtol is None
                else rtol
            )
            pairs = lanczos_pairs(model, op, top_k, rtol)
            dtype = pairs.eigenvalues.dtype
            apply = op.apply_factors
        else:
            dtype = blocks[0].dtype
            if comm.distributed:
                check_ranks(offsets, blocks[0].shape[1], dtype, budget)
            Vt = _stack_scaled(blocks, scales)  # [Ñ_r, D], the blocks freed
            acc = accumulation_dtype(dtype, None)
            pairs = dense_pairs(Vt, offsets, comm, acc, rtol, top_k)
            apply = None
        vectors = None
        if eigenvectors:
            pairs = drop_unresolved(pairs)
            coefficients = pairs.scaled_vectors()  # [Ñ, K]
            if apply is not None:
                vectors = apply(coefficients.T.to(dtype))
            else:
                vectors = dense_eigenvectors(Vt, coefficients, offsets, comm)
        return DatasetSpectrum(
            pairs.eigenvalues.to(dtype),
            vectors,
            [p for _, _, p in flat],
            sizes,
            weights,
            offsets[-1],
            pairs.threshold,
            pairs.vectors.to(dtype),
            solver,
            pairs.errors.to(dtype) if solver == "dense" else None,
            bytes_exchanged=comm.bytes,
        )


def _stack_scaled(blocks: list[Tensor], scales: list[float]) -> Tensor:
    """``[s_1 V_1ᵀ; s_2 V_2ᵀ; …]``, freeing each block as it is copied (one copy held)."""
    out = blocks[0].new_empty(sum(b.shape[0] for b in blocks), blocks[0].shape[1])
    start = 0
    for i, s in enumerate(scales):
        rows = blocks[i].shape[0]
        torch.mul(blocks[i], s, out=out[start : start + rows])
        blocks[i], start = None, start + rows
    return out


def _batch_generator(
    generator: torch.Generator | None, base_seed: int | None, b: int
) -> torch.Generator | None:
    """Batch ``b``'s Monte-Carlo generator: seeded ``base + b`` (``None``: no MC)."""
    if base_seed is None:
        return None
    device = generator.device if generator is not None else "cpu"
    return torch.Generator(device=device).manual_seed(base_seed + b)
