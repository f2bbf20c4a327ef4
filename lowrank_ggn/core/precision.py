r"""What a finite-precision spectrum resolves: an error model, and where the Gram sums.

**Accumulation.** The backpropagated factors ``V`` (``[D, NC]``) are computed in the
parameters' dtype. The Gram ``𝒢 = Vᵀ V`` may be summed in float64 from float32 factors
(``accumulate="float64"``, the default for float32/float16/bfloat16 models): the
Kronecker products, the explicit blocks' rank-k updates and ``eigh`` then run in
float64, while every forward and backward pass stays in the model's dtype.
``accumulate="native"`` sums in the parameters' dtype.

**Why float64 GEMMs.** Float32 GEMMs over blocks of the parameter dimension, summed
in float64 across blocks, do not reach float64 accuracy: the products of float32
numbers are exact in a fused multiply-add, the round-off sits in the float32 partial
sums (about ``ε_32 √b d_i d_j`` per entry for blocks of ``b`` columns), and the small
eigenvalues of trained networks have ``t_k² ≫ λ_k``. On the trained digits zoo,
blocks of 256 columns lose 16–32 % of the eigenvalues above ``1e-10·λ_max`` that
float64 sums reproduce to ``1e-3`` (``benchmarks/results/precision_cpu.md``);
random-weight 3c3d loses none, so a benchmark on random weights cannot tell. Splitting
the factors into high and low float32 parts adds GEMMs but keeps float32 sums. The
explicit rows' ``syrk`` and ``eigh`` run in float64 (rows cast chunk by chunk,
:func:`lowrank_ggn.core.engine.accumulate.symmetric_rank_k_update`).

**Error model.** With ``d_i = ‖v_i‖ = √𝒢_ii`` the factor columns' norms, ``(λ_k, u_k)``
an eigenpair of the computed Gram and

.. math::
    t_k = \Bigl(\sum_i u_{ik}^2 d_i^2\Bigr)^{1/2} = ‖\operatorname{diag}(d)\, u_k‖_2
    \quad (t_k ≥ \sqrt{λ_k}),

each computed eigenvalue carries an error of at most about

.. math::
    ε_k = c_f\,ε_f\,t_k\sqrt{λ_k} \;+\; c_s\,ε_a\sqrt{D}\,t_k^2
          \;+\; c_e\,ε_a\,λ_{\max},

one term per stage of the computation:

* **factors** (``ε_f``: machine epsilon of the parameters' dtype): a backpropagated
  column ``v_i`` carries round-off ``≈ ε_f d_i`` in random directions, so
  ``δλ_k = 2⟨δV u_k, V u_k⟩`` has size ``≈ ε_f t_k √λ_k``;
* **summation** (``ε_a``: epsilon of the accumulation dtype): each Gram entry is an
  inner product of length up to ``D``, with round-off ``≈ ε_a √D d_i d_j`` (the
  probabilistic rule of Higham & Mary, SIAM J. Sci. Comput. 2019); it moves ``λ_k`` by
  ``≈ ε_a √D t_k²``. The Kronecker and explicit forms sum the same products in other
  orders and obey the same bound;
* **eigh** (backward stable, in the accumulation dtype): ``≈ ε_a λ_max``.

Small eigenvalues of trained networks come from small factor columns (confident
samples under cross-entropy), so ``t_k`` shrinks with ``λ_k`` and float32 factors give
eigenvalues accurate to about ``1e-6`` relative far below ``ε_f λ_max``; the last
term is what limits a float32 ``eigh``. The constants are calibrated with a margin
against float64 truth on the same weights (``tests/test_precision.py`` over the
shared case list and the trained zoo; ``benchmarks/bench_precision.py``):
``c_f = 64, c_s = 1, c_e = 4``. The largest measured ratio of actual error to ``ε_k``
is stated in the README.

**Top-k calls.** The float64 sums buy the small eigenvalues; a call that returns
only the ``top_k`` largest (dense solver, the default rule, ``accumulate=None``) of a
float32 model sums its Gram in float32 first (:func:`tries_native_sums`) and keeps
that answer when the error model resolves all ``top_k`` there
(:func:`resolves_top`): each returned eigenvalue then carries the same guarantee,
``ε_k ≤ 1e-3 λ_k``, as under float64 sums, at about half the cost of the Gram's
GEMMs on CPUs. Otherwise the Gram is summed again in float64. The result's
``accumulate`` says which sums it came from.

**Resolved eigenvalues.** By default an eigenvalue is returned if
``ε_k ≤ 1e-3 · λ_k`` (:data:`RESOLVED_RTOL`): nothing returned is off by more than
``1e-3`` relative, the rest are counted as unresolved. A user ``rtol`` replaces this
rule by ``λ > rtol · λ_max``; the errors are reported either way.

**Eigenvectors.** ``e_k = V u_k / √λ_k`` divides by ``√λ_k``. Its residual
``‖G e_k − λ_k e_k‖`` is estimated as

.. math::
    r_k = c_e ε_a \frac{λ_{\max}^{3/2}}{\sqrt{λ_k}}
        + c_s ε_a \sqrt{D}\, ‖d‖\, t_k \sqrt{λ_{\max}/λ_k}
        + c_f ε_f \bigl(t_k \sqrt{λ_k} + ‖d‖ \sqrt{λ_{\max}}\bigr),

the same three stages propagated through ``V û / √λ``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lowrank_ggn.core.modes import Accumulate
from lowrank_ggn.core.tolerances import RESOLVED_RTOL

#: Calibrated constants of the three stages (see the module docstring).
C_FACTOR = 64.0
C_SUM = 1.0
C_EIGH = 4.0

#: Parameter dtypes for which ``accumulate=None`` means float64.
_LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


def accumulation_dtype(
    param_dtype: torch.dtype, accumulate: Accumulate | str | None
) -> torch.dtype:
    """The dtype the Gram is summed and diagonalised in.

    ``None``: float64 for float32/float16/bfloat16 parameters (the measured cost on CPUs
    is in the README), the parameters' dtype otherwise.

    Example:
        >>> accumulation_dtype(torch.float32, None)
        torch.float64
        >>> accumulation_dtype(torch.float32, "native")
        torch.float32
    """
    if accumulate == "native":
        return param_dtype
    if accumulate == "float64" or param_dtype in _LOW_PRECISION:
        return torch.float64
    return param_dtype


def tries_native_sums(
    param_dtype: torch.dtype,
    accumulate: Accumulate | str | None,
    top_k: int | None,
    rtol: float | None,
    num_columns: int | None = None,
) -> bool:
    """Whether a dense ``top_k`` spectrum first sums its Gram in the parameters' dtype.

    Only for float32 parameters under the defaults (``accumulate=None`` and the error
    model's rule, ``rtol=None``), with float32 matrix products at full precision
    (``torch.get_float32_matmul_precision() == "highest"``, no TF32: the error model
    assumes ``ε_32``), and for ``top_k`` at most half the ``num_columns`` of the Gram
    (more rarely resolves in float32, and a failed try costs a second Gram).
    float16/bfloat16 sums resolve too little to be worth the try, and a user ``rtol``
    does not consult the error model.

    Example:
        >>> tries_native_sums(torch.float32, None, 5, None)
        True
        >>> tries_native_sums(torch.float32, "float64", 5, None)
        False
        >>> tries_native_sums(torch.float32, None, 5, None, num_columns=8)
        False
    """
    return (
        accumulate is None
        and rtol is None
        and top_k is not None
        and param_dtype == torch.float32
        and (num_columns is None or 2 * top_k <= num_columns)
        and _full_float32_matmuls()
    )


def _full_float32_matmuls() -> bool:
    """float32 GEMMs at float32 precision: no TF32 or bfloat16 passes."""
    cuda = getattr(torch.backends, "cuda", None)
    tf32 = bool(cuda is not None and cuda.matmul.allow_tf32)
    return torch.get_float32_matmul_precision() == "highest" and not tf32


def resolves_top(evals: Tensor, errors: Tensor, k: int) -> bool:
    """Whether the ``k`` largest of ``evals`` (descending) are all resolved.

    Then sums in a finer dtype would return the same ``k`` eigenvalues (their errors
    are smaller still), each already within ``1e-3`` relative.

    Example:
        >>> lam = torch.tensor([4.0, 2.0, 1e-9])
        >>> resolves_top(lam, torch.tensor([1e-6, 1e-6, 1e-6]), 2)
        True
        >>> resolves_top(lam, torch.tensor([1e-6, 1e-6, 1e-6]), 3)
        False
    """
    if evals.numel() < k:
        return False
    lam_max = max(float(evals[0]), 0.0)
    return bool(resolved(evals[:k], errors[:k], None, lam_max).all())


def accumulation_name(param_dtype: torch.dtype, acc_dtype: torch.dtype) -> str:
    """``"float64"`` or ``"native"``: how a Gram of ``acc_dtype`` was summed."""
    return "native" if acc_dtype == param_dtype else "float64"


@dataclass(frozen=True)
class ErrorModel:
    """The three-stage error model of one Gram computation (module docstring).

    Attributes:
        factor_eps: Machine epsilon of the factors (the parameters' dtype).
        sum_eps: Machine epsilon of the accumulation and ``eigh``.
        length: ``D``, the length of the Gram's inner products.
    """

    factor_eps: float
    sum_eps: float
    length: int

    @classmethod
    def of(
        cls, param_dtype: torch.dtype, acc_dtype: torch.dtype, num_params: int
    ) -> ErrorModel:
        """The model for factors in ``param_dtype`` summed in ``acc_dtype``."""
        return cls(
            torch.finfo(param_dtype).eps, torch.finfo(acc_dtype).eps, max(num_params, 1)
        )

    def _parts(self, evals: Tensor, evecs: Tensor, diag: Tensor) -> tuple:
        lam = evals.to(torch.float64).clamp_min(0)
        d2 = diag.to(torch.float64).clamp_min(0)
        t = ((evecs.to(torch.float64) ** 2).T @ d2).sqrt()  # [K]
        lam_max = float(lam.max()) if lam.numel() else 0.0
        return lam, t, lam_max, float(d2.sum().sqrt())

    def eigenvalue_errors(self, evals: Tensor, evecs: Tensor, diag: Tensor) -> Tensor:
        """``ε_k`` ``[K]`` (float64) for eigenpairs ``evals [K]``, ``evecs [NC, K]``.

        ``diag`` ``[NC]``: the Gram's diagonal ``d_i²``. ``λ_max`` is the largest of
        ``evals``: pass the full spectrum's top eigenvalue first.
        """
        lam, t, lam_max, _ = self._parts(evals, evecs, diag)
        return (
            C_FACTOR * self.factor_eps * t * lam.sqrt()
            + C_SUM * self.sum_eps * math.sqrt(self.length) * t**2
            + C_EIGH * self.sum_eps * lam_max
        )

    def eigenvector_residuals(
        self, evals: Tensor, evecs: Tensor, diag: Tensor, lam_max: float
    ) -> Tensor:
        """``r_k`` ``[K]`` (float64): estimated ``‖G e_k − λ_k e_k‖`` for unit ``e_k``."""
        lam, t, _, norm_d = self._parts(evals, evecs, diag)
        lam = lam.clamp_min(torch.finfo(torch.float64).tiny)
        ratio = (lam_max / lam).sqrt()
        return (
            C_EIGH * self.sum_eps * lam_max * ratio
            + C_SUM * self.sum_eps * math.sqrt(self.length) * norm_d * t * ratio
            + C_FACTOR * self.factor_eps * (t * lam.sqrt() + norm_d * lam_max**0.5)
        )

    def operator_errors(self, residuals: Tensor, lam_max: float) -> Tensor:
        """Errors of Ritz values from a matrix-free solver: ``‖r_k‖ + c_f ε_f λ_max``.

        A Ritz value lies within its residual norm of an eigenvalue of the operator
        as applied; the operator's own round-off is bounded norm-wise.
        """
        return residuals.to(torch.float64).abs() + C_FACTOR * self.factor_eps * lam_max


def resolved(
    evals: Tensor, errors: Tensor, rtol: float | None, lam_max: float
) -> Tensor:
    """Which eigenvalues to return: ``ε_k ≤ 1e-3 λ_k``, or ``λ > rtol·λ_max`` if given."""
    lam = evals.to(torch.float64)
    if lam_max <= 0:
        return torch.zeros_like(lam, dtype=torch.bool)
    if rtol is not None:
        return lam > rtol * lam_max
    return (lam > 0) & (errors <= RESOLVED_RTOL * lam)


__all__ = [
    "C_EIGH",
    "C_FACTOR",
    "C_SUM",
    "ErrorModel",
    "RESOLVED_RTOL",
    "accumulation_dtype",
    "accumulation_name",
    "resolved",
    "resolves_top",
    "tries_native_sums",
]
