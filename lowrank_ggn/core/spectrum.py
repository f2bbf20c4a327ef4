r"""The nonzero GGN spectrum and its eigenvectors, from the ``NC × NC`` Gram matrix.

With ``𝒢 = Vᵀ V = U Λ Uᵀ`` (see :mod:`lowrank_ggn.core.gram`), the GGN ``G = V Vᵀ`` has

.. math::
    G e_k = λ_k e_k, \qquad e_k = \frac{V u_k}{\sqrt{λ_k}} = \frac{J^⊤ (S u_k)}{\sqrt{λ_k}},

so each eigenvector is one full-batch vector-Jacobian product with the cotangent
``S u_k / √λ_k``; the ``D × D`` matrix is never formed, for BatchNorm models too.

**Which eigenvalues are returned.** Every eigenvalue comes with an error estimate
``ε_k`` from the error model of :mod:`lowrank_ggn.core.precision` (factor precision,
accumulation dtype and length, ``eigh``). By default the eigenvalues with
``ε_k ≤ 1e-3 · λ_k`` are returned; the others are counted (``num_unresolved``) and
lie at or below ``threshold``. In float64 that resolves down to about ``1e-12·λ_max``;
for a float32 model with the Gram summed in float64 (the default) about as far, as
the small eigenvalues of trained networks come from small factor columns. Pass
``rtol`` to use ``λ > rtol · λ_max`` instead.

**Eigenvectors.** ``e_k = V u_k / √λ_k`` divides by ``√λ_k``: each returned
eigenvector comes with an estimate of its residual ``‖G e_k − λ_k e_k‖``
(``eigenvector_residuals``). Eigenvectors of unresolved eigenvalues (let through by a
small ``rtol``) are dropped, from ``eigenvalues`` too, with a
:class:`NearZeroEigenvalueWarning`; :func:`parameter_eigenvectors` refuses
eigenvalues at the ``eigh`` round-off floor.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lowrank_ggn.core.engine import EngineReport
from lowrank_ggn.core.linearization import DEFAULT_CHUNK, Linearization
from lowrank_ggn.core.paths import EnginePath
from lowrank_ggn.core.precision import (
    C_EIGH,
    RESOLVED_RTOL,
    ErrorModel,
    accumulation_name,
    resolved,
)


class NearZeroEigenvalueWarning(UserWarning):
    """Eigenvectors were requested at eigenvalues indistinguishable from zero."""


@dataclass
class GGNSpectrum:
    """Result of :func:`ggn_spectrum`.

    Attributes:
        eigenvalues: ``[K]``, descending, those the error model resolves to
            ``1e-3`` relative (or above ``rtol · λ_max``), or the top ``top_k`` of
            them; in the parameters' dtype.
        eigenvectors: ``[K, D]`` with orthonormal rows, parameters flattened in the
            order of ``params``; ``None`` unless asked for. ``K`` is the number of
            eigenvalues, or ``k`` when ``eigenvectors=k`` asked for the top ``k``.
        path: The engine's path (``.name``, ``.reason``, ``.mixing_modules``).
        num_columns: ``N·C``, the size of the Gram matrix and the rank bound.
        threshold: Unresolved eigenvalues lie at or below this absolute value
            (``rtol · λ_max`` with ``rtol``; 0 if every eigenvalue was resolved).
        gram_eigenvectors: ``[N·C, K]``, the Gram eigenvectors ``u_k`` (sample-major).
        engine_report: How the Gram matrix (or operator) and the eigenpairs were
            computed: strategy, solver, per-layer treatment and pass counts
            (:class:`lowrank_ggn.core.engine.EngineReport`).
        eigenvalue_errors: ``[K]``, estimated absolute error ``ε_k`` of each
            eigenvalue (:mod:`lowrank_ggn.core.precision`).
        eigenvector_residuals: ``[K_e]``, estimated ``‖G e_k − λ_k e_k‖`` of each
            returned eigenvector; ``None`` without eigenvectors.
        num_unresolved: Eigenvalues not returned because the error model cannot
            tell them from zero to ``1e-3`` relative (or below ``rtol · λ_max``).
            ``threshold`` and this count are those of the sums used: a float32
            model's ``top_k`` from float32 sums (``accumulate == "native"``)
            leaves more unresolved than float64 sums would.
        accumulate: ``"float64"`` or ``"native"``: the dtype the Gram was summed and
            diagonalised in.

    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    path: EnginePath
    num_columns: int
    threshold: float
    gram_eigenvectors: Tensor
    engine_report: EngineReport | None = None
    eigenvalue_errors: Tensor | None = None
    eigenvector_residuals: Tensor | None = None
    num_unresolved: int = 0
    accumulate: str = "native"

    @property
    def rank(self) -> int:
        """Number of returned eigenvalues."""
        return self.eigenvalues.numel()


@dataclass
class GramEigenpairs:
    """Eigenpairs of a Gram matrix with their error estimates (working dtype).

    Attributes:
        eigenvalues: ``[K]`` descending, the returned ones.
        vectors: ``[N·C, K]``.
        errors: ``[K]`` float64, ``ε_k``.
        threshold: Unresolved eigenvalues lie at or below it.
        num_unresolved: How many were not returned.
        diag: ``[N·C]``, the Gram's diagonal (``None`` for a matrix-free solver).
        lam_max: The largest eigenvalue.
        model: The :class:`~lowrank_ggn.core.precision.ErrorModel` used.
    """

    eigenvalues: Tensor
    vectors: Tensor
    errors: Tensor
    threshold: float
    num_unresolved: int
    diag: Tensor | None
    lam_max: float
    model: ErrorModel

    def pick(self, index: Tensor) -> GramEigenpairs:
        """The pairs at positions ``index`` (the rest are no longer returned)."""
        return replace(
            self,
            eigenvalues=self.eigenvalues[index],
            vectors=self.vectors[:, index],
            errors=self.errors[index],
        )

    def select(self, rtol: float | None, top_k: int | None) -> GramEigenpairs:
        """The resolved pairs (or those above ``rtol · λ_max``), then the ``top_k``."""
        return select_pairs(
            self.eigenvalues,
            self.vectors,
            self.errors,
            rtol,
            top_k,
            self.diag,
            self.model,
        )

    def scaled_vectors(self) -> Tensor:
        """``u_k / √λ_k`` ``[N·C, K]``: the coefficients of the eigenvectors ``V u / √λ``."""
        return self.vectors / self.eigenvalues.sqrt()

    def residuals(self, k: int) -> Tensor:
        """Estimated ``‖G e − λ e‖`` of the leading ``k`` parameter eigenvectors."""
        lam, vec = self.eigenvalues[:k], self.vectors[:, :k]
        if self.diag is None:  # Ritz pairs: ‖V r‖/√λ ≤ √(λ_max/λ)·‖r‖
            ratio = (self.lam_max / lam.double().clamp_min(1e-300)).sqrt()
            return ratio * self.errors[:k]
        return self.model.eigenvector_residuals(lam, vec, self.diag, self.lam_max)


def default_rtol(num_columns: int, dtype: torch.dtype) -> float:
    """``N·C · eps(dtype)``: the worst-case rank rule (data sets' Lanczos solver)."""
    return max(num_columns, 1) * torch.finfo(dtype).eps


def select_pairs(
    evals: Tensor,
    evecs: Tensor,
    errors: Tensor,
    rtol: float | None,
    top_k: int | None,
    diag: Tensor | None,
    model: ErrorModel,
) -> GramEigenpairs:
    """Keep the resolved pairs (or those above ``rtol · λ_max``), then ``top_k``."""
    lam_max = max(evals[0].item(), 0.0) if evals.numel() else 0.0
    keep = resolved(evals, errors, rtol, lam_max)
    dropped = ~keep
    if rtol is not None:
        threshold = rtol * lam_max
    elif bool(dropped.any()):
        threshold = float((evals.double() + errors)[dropped].max().clamp_min(0))
    else:
        threshold = 0.0
    index = keep.nonzero().flatten()
    if top_k is not None:
        index = index[:top_k]
    return GramEigenpairs(
        evals[index],
        evecs[:, index],
        errors[index],
        threshold,
        int(dropped.sum()),
        diag,
        lam_max,
        model,
    )


def ritz_pairs(
    evals: Tensor,
    evecs: Tensor,
    residuals: Tensor,
    rtol: float | None,
    top_k: int | None,
    model: ErrorModel,
) -> GramEigenpairs:
    """Pairs of a matrix-free solver, selected as the dense solver's are.

    Each eigenvalue's error is its residual plus the operator's round-off
    (:meth:`lowrank_ggn.core.precision.ErrorModel.operator_errors`).
    """
    errors = model.operator_errors(residuals, max(evals[0].item(), 0.0))
    return select_pairs(evals, evecs, errors, rtol, top_k, None, model)


def gram_eigh(gram: Tensor, model: ErrorModel | None = None) -> GramEigenpairs:
    """Every eigenpair of a symmetric PSD Gram matrix, descending, with its error.

    Args:
        gram: ``[N·C, N·C]``; ``eigh`` runs in its dtype.
        model: The computation's :class:`~lowrank_ggn.core.precision.ErrorModel`
            (default: factors and sums in ``gram``'s dtype, length ``N·C``).

    Returns:
        All pairs (nothing dropped yet: :meth:`GramEigenpairs.select` does that).
    """
    if model is None:
        model = ErrorModel.of(gram.dtype, gram.dtype, gram.shape[0])
    if not torch.isfinite(gram).all():
        raise ValueError(
            "the Gram matrix has non-finite entries (NaN or Inf): products of the "
            "layer inputs or factors overflow (inputs of very large scale), or the "
            "model's gradients are NaN/Inf for this batch. Rescale the inputs, or try "
            "engine='generic' (explicit rows, no products of inputs)."
        )
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0), evecs.flip(1)
    diag = gram.diagonal()
    errors = model.eigenvalue_errors(evals, evecs, diag)
    lam_max = max(evals[0].item(), 0.0) if evals.numel() else 0.0
    return GramEigenpairs(evals, evecs, errors, 0.0, 0, diag, lam_max, model)


def parameter_eigenvectors(
    lin: Linearization,
    eigenvalues: Tensor,
    gram_eigenvectors: Tensor,
    chunk: int = DEFAULT_CHUNK,
) -> Tensor:
    """``e_k = Jᵀ (S u_k) / √λ_k`` as rows ``[K, D]`` (one batched VJP).

    The cotangents are formed in the dtype of ``eigenvalues`` and cast to the
    parameters' dtype for the backward pass.

    Raises:
        ValueError: If an eigenvalue is at or below the ``eigh`` round-off floor
            ``c_e · eps · max(eigenvalues)`` (in the eigenvalues' dtype), where
            dividing by ``√λ_k`` is meaningless.
    """
    if eigenvalues.numel() == 0:
        return lin.outputs.new_zeros(0, lin.fmodel.num_params)
    floor = _zero_floor(eigenvalues)
    if not bool((eigenvalues > floor).all()):
        raise ValueError(
            f"eigenvalues down to {eigenvalues.min().item():.3e} are at or below the "
            f"round-off floor {floor:.3e} (c_e·eps·λ_max); their eigenvectors "
            "V u / √λ would divide by ≈0. Pass only eigenvalues above it."
        )
    weights = (gram_eigenvectors / eigenvalues.sqrt()).T  # [K, N·C]
    return lin.apply_factors(weights.to(lin.outputs.dtype), chunk)


def _zero_floor(eigenvalues: Tensor) -> float:
    """``c_e · eps · λ_max``: below it ``eigh`` cannot tell eigenvalues from zero."""
    lam_max = max(eigenvalues.max().item(), 0.0) if eigenvalues.numel() else 0.0
    return C_EIGH * torch.finfo(eigenvalues.dtype).eps * lam_max


def drop_unresolved(pairs: GramEigenpairs) -> GramEigenpairs:
    """Drop pairs the error model does not resolve, with a warning (eigenvectors asked)."""
    ok = resolved(pairs.eigenvalues, pairs.errors, None, pairs.lam_max)
    keep, total = int(ok.sum()), pairs.eigenvalues.numel()
    if keep == total:
        return pairs
    floor = float((pairs.eigenvalues.double() + pairs.errors)[~ok].max())
    warnings.warn(
        f"{total - keep} of {total} eigenvalues are at or below the zero threshold "
        f"{floor:.3e}: the error model cannot resolve them to {RESOLVED_RTOL:g} "
        "relative, and their eigenvectors V u / √λ would amplify round-off; they are "
        "dropped from eigenvalues and eigenvectors. Use rtol=None (the default), or "
        "eigenvectors=False to get the small eigenvalues alone.",
        NearZeroEigenvalueWarning,
        stacklevel=4,
    )
    out = pairs.pick(ok.nonzero().flatten())
    out.threshold = max(pairs.threshold, floor)
    out.num_unresolved = pairs.num_unresolved + total - keep
    return out


def check_eigenvectors(eigenvectors: bool | int) -> None:
    """``eigenvectors`` must be a bool or a positive int (before any model call)."""
    if isinstance(eigenvectors, bool):
        return
    if not isinstance(eigenvectors, int) or eigenvectors < 1:
        raise ValueError(
            "eigenvectors must be True/False or a positive int (eigenvectors of the "
            f"top k eigenvalues); got {eigenvectors!r}."
        )


def eigenvector_count(eigenvectors: bool | int, top_k: int | None) -> int:
    """How many eigenvectors a spectrum call returns at most (``2**40``: all)."""
    if eigenvectors is True:
        return top_k or 2**40
    return int(eigenvectors)


def spectrum_result(
    lin: Linearization,
    pairs: GramEigenpairs,
    eigenvectors: bool | int,
    chunk: int,
    report: EngineReport | None,
    columns: slice | Tensor = slice(None),
) -> GGNSpectrum:
    """The result from Gram eigenpairs; eigenvectors ``e_k = (V u_k)[columns] / √λ_k``.

    ``report``: how the Gram (or the Lanczos eigenpairs) was computed. ``columns``
    selects a parameter group's block (``V_g u / √λ`` are the rows of ``V u / √λ``
    that belong to the group): a slice or flat positions.
    """
    vectors = residuals = None
    if eigenvectors is not False:
        pairs = drop_unresolved(pairs)
        n = pairs.eigenvalues.numel()
        k = n if eigenvectors is True else min(eigenvectors, n)
        vectors = parameter_eigenvectors(
            lin, pairs.eigenvalues[:k], pairs.vectors[:, :k], chunk
        )[:, columns]
        residuals = pairs.residuals(k)
    dtype = lin.outputs.dtype
    return GGNSpectrum(
        pairs.eigenvalues.to(dtype),
        vectors,
        lin.path,
        lin.num_columns,
        pairs.threshold,
        pairs.vectors.to(dtype),
        report,
        pairs.errors.to(dtype),
        None if residuals is None else residuals.to(dtype),
        pairs.num_unresolved,
        accumulation_name(dtype, pairs.vectors.dtype),
    )
