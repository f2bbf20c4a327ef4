r"""The nonzero GGN spectrum and its eigenvectors, from the ``NC × NC`` Gram matrix.

With ``𝒢 = Vᵀ V = U Λ Uᵀ`` (see :mod:`lowrank_ggn.gram`), the GGN ``G = V Vᵀ`` has

.. math::
    G e_k = λ_k e_k, \qquad e_k = \frac{V u_k}{\sqrt{λ_k}} = \frac{J^⊤ (S u_k)}{\sqrt{λ_k}},

so each eigenvector is one full-batch vector-Jacobian product with the cotangent
``S u_k / √λ_k``; the ``D × D`` matrix is never formed, for BatchNorm models too.

**Zero threshold.** An eigenvalue counts as nonzero if
``λ > rtol · λ_max`` with ``rtol = N·C · eps(dtype)`` by default (``eps`` the machine
epsilon of the parameters' dtype: ``2.2e-16`` in float64, ``1.2e-7`` in float32). The
Gram matrix's eigenvalues carry a round-off error of about ``N·C · eps · λ_max``, so
smaller values cannot be told apart from zero. Pass ``rtol`` to change it.

**Near-zero eigenvalues and eigenvectors.** ``e_k = V u_k / √λ_k`` divides by
``√λ_k``; below the default threshold ``N·C · eps · λ_max`` that amplifies round-off
into garbage. A smaller ``rtol`` is honoured for eigenvalues alone, but when
eigenvectors are requested, eigenpairs below the default threshold are dropped (from
``eigenvalues`` too, so both stay aligned) with a :class:`NearZeroEigenvalueWarning`.
:func:`parameter_eigenvectors` refuses them with a ``ValueError``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowrank_ggn._state import model_preserved
from lowrank_ggn._validation import (
    check_linearization_memory,
    check_options,
)
from lowrank_ggn.engine import EngineReport, Solver
from lowrank_ggn.factors import DEFAULT_CHUNK, Linearization
from lowrank_ggn.gram import check_engine, gram_from_linearization, linearize_request
from lowrank_ggn.sample_mixing import EnginePath
from lowrank_ggn.solvers import (
    check_solver,
    choose_solver,
    lanczos_eigenpairs,
)


class NearZeroEigenvalueWarning(UserWarning):
    """Eigenvectors were requested at eigenvalues indistinguishable from zero."""


@dataclass
class GGNSpectrum:
    """Result of :func:`ggn_spectrum`.

    Attributes:
        eigenvalues: ``[K]``, descending, all above the zero threshold (or the top
            ``top_k`` of them).
        eigenvectors: ``[K, D]`` with orthonormal rows, parameters flattened in the
            order of ``params``; ``None`` unless asked for. ``K`` is the number of
            eigenvalues, or ``k`` when ``eigenvectors=k`` asked for the top ``k``.
        path: The engine's path (``.name``, ``.reason``, ``.mixing_modules``).
        num_columns: ``N·C``, the size of the Gram matrix and the rank bound.
        threshold: The absolute zero threshold ``rtol · λ_max`` that was applied.
        gram_eigenvectors: ``[N·C, K]``, the Gram eigenvectors ``u_k`` (sample-major).
        engine_report: How the Gram matrix (or operator) and the eigenpairs were
            computed: strategy, solver, per-layer treatment and pass counts
            (:class:`lowrank_ggn.engine.EngineReport`).

    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    path: EnginePath
    num_columns: int
    threshold: float
    gram_eigenvectors: Tensor
    engine_report: EngineReport | None = None

    @property
    def rank(self) -> int:
        """Number of returned eigenvalues."""
        return self.eigenvalues.numel()


def default_rtol(num_columns: int, dtype: torch.dtype) -> float:
    """``N·C · eps(dtype)``, the default relative zero threshold."""
    return max(num_columns, 1) * torch.finfo(dtype).eps


def spectrum_from_gram(
    gram: Tensor, top_k: int | None = None, rtol: float | None = None
) -> tuple[Tensor, Tensor, float]:
    """Nonzero eigenpairs of a symmetric PSD Gram matrix, descending.

    Returns:
        ``(eigenvalues [K], eigenvectors [N·C, K], absolute threshold)``.

    """
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0), evecs.flip(1)
    rtol = default_rtol(gram.shape[0], gram.dtype) if rtol is None else rtol
    lam_max = max(evals[0].item(), 0.0) if evals.numel() else 0.0
    threshold = rtol * lam_max
    keep = (
        evals > threshold if lam_max > 0 else torch.zeros_like(evals, dtype=torch.bool)
    )
    count = int(keep.sum())
    if top_k is not None:
        count = min(count, top_k)
    return evals[:count], evecs[:, :count], threshold


def parameter_eigenvectors(
    lin: Linearization,
    eigenvalues: Tensor,
    gram_eigenvectors: Tensor,
    chunk: int = DEFAULT_CHUNK,
) -> Tensor:
    """``e_k = Jᵀ (S u_k) / √λ_k`` as rows ``[K, D]`` (one batched VJP).

    Raises:
        ValueError: If an eigenvalue is at or below the round-off floor
            ``N·C · eps · max(eigenvalues)``, where dividing by ``√λ_k`` is meaningless.
    """
    if eigenvalues.numel() == 0:
        return eigenvalues.new_zeros(0, lin.fmodel.num_params)
    floor = _zero_floor(eigenvalues, lin.num_columns)
    if not bool((eigenvalues > floor).all()):
        raise ValueError(
            f"eigenvalues down to {eigenvalues.min().item():.3e} are at or below the "
            f"zero threshold {floor:.3e} (N·C·eps·λ_max); their eigenvectors "
            "V u / √λ would divide by ≈0. Pass only eigenvalues above it."
        )
    weights = (gram_eigenvectors / eigenvalues.sqrt()).T  # [K, N·C]
    return lin.apply_factors(weights, chunk)


def _zero_floor(eigenvalues: Tensor, num_columns: int) -> float:
    """``N·C · eps · λ_max``: below it eigenvalues are round-off."""
    lam_max = max(eigenvalues.max().item(), 0.0) if eigenvalues.numel() else 0.0
    return default_rtol(num_columns, eigenvalues.dtype) * lam_max


def _drop_near_zero(
    evals: Tensor, evecs: Tensor, threshold: float, num_columns: int
) -> tuple[Tensor, Tensor, float]:
    """Drop eigenpairs below the round-off floor, with a warning (eigenvectors asked)."""
    floor = _zero_floor(evals, num_columns)
    keep = int((evals > floor).sum())
    if keep < evals.numel():
        warnings.warn(
            f"{evals.numel() - keep} of {evals.numel()} eigenvalues are at or below "
            f"the zero threshold {floor:.3e} (N·C·eps·λ_max), so their eigenvectors "
            "would divide by ≈0; they are dropped from eigenvalues and eigenvectors. "
            "Use rtol=None (the default), or eigenvectors=False to get the small "
            "eigenvalues alone.",
            NearZeroEigenvalueWarning,
            stacklevel=3,
        )
        return evals[:keep], evecs[:, :keep], max(threshold, floor)
    return evals, evecs, threshold


def _check_eigenvectors(eigenvectors: bool | int) -> None:
    if isinstance(eigenvectors, bool):
        return
    if not isinstance(eigenvectors, int) or eigenvectors < 1:
        raise ValueError(
            "eigenvectors must be True/False or a positive int (eigenvectors of the "
            f"top k eigenvalues); got {eigenvectors!r}."
        )


def _result(
    lin: Linearization,
    gram: Tensor | tuple[Tensor, Tensor, float],
    top_k: int | None,
    eigenvectors: bool | int,
    rtol: float | None,
    chunk: int,
    columns: slice = slice(None),
) -> GGNSpectrum:
    """Eigenpairs from a Gram matrix; eigenvectors ``e_k = (V u_k)[columns] / √λ_k``.

    ``columns`` selects a parameter group's block (``V_g u / √λ`` are the rows of
    ``V u / √λ`` that belong to the group).
    """
    if isinstance(gram, tuple):  # eigenpairs of the operator (Lanczos)
        evals, evecs, threshold = gram
    else:
        evals, evecs, threshold = spectrum_from_gram(gram, top_k, rtol)
    vectors = None
    if eigenvectors is not False:
        evals, evecs, threshold = _drop_near_zero(
            evals, evecs, threshold, lin.num_columns
        )
        k = evals.numel() if eigenvectors is True else min(eigenvectors, evals.numel())
        vectors = parameter_eigenvectors(lin, evals[:k], evecs[:, :k], chunk)
        vectors = vectors[:, columns]
    return GGNSpectrum(
        evals, vectors, lin.path, lin.num_columns, threshold, evecs, lin.engine_report
    )


def ggn_spectrum(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Sequence[Tensor] | None = None,
    top_k: int | None = None,
    eigenvectors: bool | int = False,
    rtol: float | None = None,
    chunk: int = DEFAULT_CHUNK,
    path: str | None = None,
    engine: str = "layerwise",
    memory_budget: float | None = None,
    mc_samples: int | None = None,
    generator: torch.Generator | None = None,
    subsampling: Sequence[int] | Tensor | None = None,
    param_groups: Sequence[Mapping] | None = None,
    strategy: str | None = None,
    solver: str = "dense",
    progress: bool | None = None,
) -> GGNSpectrum | list[GGNSpectrum]:
    r"""Exact nonzero eigenvalues (and eigenvectors) of the mini-batch GGN.

    ``G = Σ_n J_θF_nᵀ (∇²_{F_n} L) J_θF_n`` for the batch loss ``L`` (reduction
    included), through its ``N·C × N·C`` Gram matrix. Correct for any model,
    BatchNorm in train mode included.

    Args:
        model: Module mapping ``inputs`` ``[N, *in]`` to ``[N, *out]``; never changed.
        loss_func: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss``
            (reduction ``'mean'`` or ``'sum'``).
        inputs: The batch.
        targets: Its targets.
        params: Parameters of ``model``; default: all that require grad. They define
            the flattening order of the eigenvectors.
        top_k: Return only the ``top_k`` largest nonzero eigenvalues.
        eigenvectors: Also return parameter-space eigenvectors ``[K, D]``: ``True``
            for every returned eigenvalue, an int ``k`` for the top ``k`` only (all
            nonzero eigenvalues, the ``k`` leading eigenvectors: one batched backward
            pass of ``k`` cotangents).
        rtol: Relative zero threshold (default ``N·C · eps``; see module docstring).
            With ``eigenvectors=True``, eigenpairs below the default threshold are
            dropped with a :class:`NearZeroEigenvalueWarning`.
        chunk: Factor columns per vmapped backward pass.
        path: ``None`` (automatic), ``"per_sample"`` or ``"full_batch"``.
        engine: ``"layerwise"`` (default) or ``"generic"`` Gram computation.
        memory_budget: Bytes for the Gram matrices, ``S`` and the layer-wise
            engine's factor blocks (``Vᵀ`` too with ``engine="generic"``); ``None``:
            ``LOWRANK_GGN_MEMORY_BUDGET`` or 4 GiB (see :mod:`lowrank_ggn._validation`).
        mc_samples: ``M`` Monte-Carlo factor columns per sample: the spectrum of an
            unbiased estimate of the GGN, from an ``N·M × N·M`` Gram
            (:func:`lowrank_ggn.loss_factors.sampled_loss_hessian_factors`).
        generator: ``torch.Generator`` for the Monte-Carlo draws (same seed, same
            result).
        subsampling: Batch positions ``S``: spectrum of ``κ J_Sᵀ H_SS J_S``
            (``κ = N/|S|`` for ``'mean'``, 1 for ``'sum'``), forward pass on the
            whole batch (:mod:`lowrank_ggn.subsampling`, BatchNorm explained there).
        param_groups: ``[{"params": [...]}, …]``: one :class:`GGNSpectrum` per group,
            of that diagonal block of the GGN, eigenvectors ``[K, D_g]`` in the
            group's parameters (in the group's order); one forward and one backward
            pass for all groups (:mod:`lowrank_ggn.param_groups`). Excludes
            ``params``.
        strategy: How the Gram's columns are backpropagated: ``None`` (the cost
            model chooses), ``"per_sample"``, ``"bn_split"``, ``"columns"`` or
            ``"streamed"`` (:mod:`lowrank_ggn.engine.report`); all exact.
        solver: ``"dense"`` (the Gram matrix and ``eigh``: every nonzero
            eigenvalue), ``"lanczos"`` (matrix-free block Lanczos on the Gram
            operator, one batched VJP and JVP per block; needs ``top_k``) or
            ``"auto"`` (Lanczos when ``top_k`` is given and the cost model of
            :func:`lowrank_ggn.solvers.choose_solver` favours it).
            ``.engine_report.solver`` says which ran.
        progress: Progress bar on stderr (``None``: for calls estimated to take
            more than a few seconds).

    Returns:
        A :class:`GGNSpectrum`, or a list of them with ``param_groups``.

    Example:
        >>> import torch
        >>> from lowrank_ggn.reference import dense_ggn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
        ...                             torch.nn.ReLU(), torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
        >>> res = ggn_spectrum(model, torch.nn.CrossEntropyLoss(), X, y, eigenvectors=True)
        >>> res.path.name
        'full_batch'
        >>> G = dense_ggn(model, torch.nn.CrossEntropyLoss(), X, y)
        >>> assert torch.allclose(res.eigenvalues.sum(), G.trace())
        >>> e = res.eigenvectors
        >>> assert torch.allclose(G @ e.T, e.T * res.eigenvalues)

    """
    _check_eigenvectors(eigenvectors)
    check_options(chunk=chunk, rtol=rtol, top_k=top_k, memory_budget=memory_budget)
    forced = check_engine(engine, strategy)
    chosen = check_solver(solver, top_k, param_groups, engine)
    with model_preserved(model):
        lin, columns = linearize_request(
            model,
            loss_func,
            inputs,
            targets,
            params=params,
            param_groups=param_groups,
            path=path,
            mc_samples=mc_samples,
            generator=generator,
            subsampling=subsampling,
            memory_budget=memory_budget,
            engine=engine,
            gram=chosen is Solver.DENSE,
        )
        if chosen is Solver.AUTO:
            chosen = choose_solver(lin, top_k)
            if chosen is Solver.DENSE:
                check_linearization_memory(lin, memory_budget, engine)
        if chosen is Solver.LANCZOS:
            evals, evecs = lanczos_eigenpairs(lin, top_k, memory_budget, progress)
            rtol = default_rtol(lin.num_columns, evals.dtype) if rtol is None else rtol
            threshold = rtol * max(evals[0].item(), 0.0)
            keep = int((evals > threshold).sum()) if threshold > 0 else 0
            pairs = evals[:keep], evecs[:, :keep], threshold
            return _result(lin, pairs, top_k, eigenvectors, rtol, chunk)
        grams = gram_from_linearization(
            lin, chunk, engine, memory_budget, columns, forced, progress
        )
        lin.engine_report.solver = Solver.DENSE
        if columns is None:
            return _result(lin, grams, top_k, eigenvectors, rtol, chunk)
        return [
            _result(lin, gram, top_k, eigenvectors, rtol, chunk, cols)
            for gram, cols in zip(grams, columns)
        ]
