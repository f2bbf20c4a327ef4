"""The block Lanczos eigensolver on structured matrices with known spectra."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lowrank_ggn.core.lanczos import (
    BASIS_BLOCKS,
    top_eigenpairs,
)
from lowrank_ggn.core.tolerances import LANCZOS_RTOL

F64 = torch.float64
#: Eigenvalue error relative to λ_max in float64 at the default tolerance: Ritz values
#: err by about ‖r‖²/gap ≈ 1e-12·λ_max, so 1e-8 leaves a wide margin.
RTOL = 1e-8
#: Deviation of YᵀY from the identity in float64 (full reorthogonalisation).
ORTH_TOL = 1e-12
#: Residuals recomputed with the true matrix may exceed the stored ones by rounding.
RES_SLACK = 1.01
#: Float32 eigenvalue error relative to λ_max (measured worst case over SPECTRA:
#: 4e-8, the rounding of the float32 result) and orthonormality of the float32
#: columns (measured worst case: 4e-7).
TOL_FLOAT64 = LANCZOS_RTOL[torch.float64]
TOL_FLOAT32 = LANCZOS_RTOL[torch.float32]
RTOL_FLOAT32 = 1e-6
ORTH_TOL_FLOAT32 = 5e-6


def _operator(eigenvalues: Tensor, seed: int = 0) -> Tensor:
    """``U diag(λ) Uᵀ`` with a random orthogonal ``U`` (float64)."""
    n = eigenvalues.numel()
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return (U * eigenvalues) @ U.T


class _Counting:
    """``X ↦ A X`` that records the width and dtype of every block it is given."""

    def __init__(self, A: Tensor):
        self.A, self.widths, self.dtypes = A, [], []

    def __call__(self, X: Tensor) -> Tensor:
        self.widths.append(X.shape[1])
        self.dtypes.append(X.dtype)
        return self.A.to(X.dtype) @ X


def _check_pairs(A, evals, evecs, info, tol, rtol=RTOL, orth_tol=ORTH_TOL):
    """Eigenvalues against ``eigvalsh``, residuals with the true ``A``, orthonormality."""
    k = evals.numel()
    dense = torch.linalg.eigvalsh(A).flip(0)
    lam_max = dense[0].item()
    assert torch.isfinite(evals).all() and torch.isfinite(evecs).all()
    err = (evals.to(F64) - dense[:k]).abs() / lam_max
    assert err.max() <= rtol, f"eigenvalue errors / λ_max: {err.tolist()}"
    Y, theta = evecs.to(F64), evals.to(F64)
    res = (A @ Y - Y * theta).norm(dim=0)
    assert info.converged
    assert (res <= RES_SLACK * tol * lam_max + rtol * lam_max).all(), (
        f"residuals / λ_max {(res / lam_max).tolist()} above tol {tol:g}"
    )
    assert (info.residuals.to(F64) <= tol * lam_max * RES_SLACK).all()
    gram_err = (evecs.T @ evecs - torch.eye(k, dtype=evecs.dtype)).abs().max()
    assert gram_err <= orth_tol, f"YᵀY deviates from I by {gram_err:.2e}"


SPECTRA = {
    # 8 decades of geometric decay
    "decaying": (torch.logspace(0, -8, 300, dtype=F64), 6),
    # eight eigenvalues within 1e-3 of each other, then a gap
    "clustered": (
        torch.cat([1 + 1e-4 * torch.arange(8, 0, -1), torch.logspace(-1, -6, 292)]),
        5,
    ),
    # top eigenvalue of multiplicity four
    "repeated_top": (
        torch.cat([torch.full((4,), 2.0), torch.logspace(0, -4, 196)]).to(F64),
        6,
    ),
    # power-law decay
    "power_law": (torch.arange(1, 251, dtype=F64) ** -1.0, 4),
    # one decade over 250 eigenvalues: relative gaps of 1 %, many iterations
    "slow": (torch.logspace(0, -1, 250, dtype=F64), 4),
}


@pytest.mark.parametrize("name", list(SPECTRA))
def test_known_spectra_float64(name):
    eigenvalues, k = SPECTRA[name]
    A = _operator(eigenvalues.to(F64))
    evals, evecs, info = top_eigenpairs(lambda X: A @ X, A.shape[0], k, dtype=F64)
    assert evals.dtype == evecs.dtype == F64
    assert evals.shape == (k,) and evecs.shape == (A.shape[0], k)
    assert (evals[:-1] >= evals[1:]).all(), "eigenvalues not descending"
    _check_pairs(A, evals, evecs, info, TOL_FLOAT64)


def test_eigenvectors_span_the_top_eigenspace():
    """Davis–Kahan: ``sin ∠(Y, V_k) ≤ ‖R‖_F / gap`` with the gap ``λ_k − λ_{k+1}``."""
    eigenvalues, k = SPECTRA["decaying"]
    A = _operator(eigenvalues)
    evals, evecs, info = top_eigenpairs(lambda X: A @ X, A.shape[0], k, dtype=F64)
    _, V = torch.linalg.eigh(A)
    V = V.flip(1)[:, :k]
    gap = (eigenvalues[k - 1] - eigenvalues[k]).item()
    sin_bound = (A @ evecs - evecs * evals).norm().item() / gap
    cos = torch.linalg.svdvals(V.T @ evecs).min().item()
    assert 1 - cos**2 <= sin_bound**2 + ORTH_TOL, (1 - cos**2, sin_bound**2)


def test_restarts_keep_accuracy():
    """A narrow block forces thick restarts: more products than the basis holds."""
    eigenvalues, k = SPECTRA["slow"]
    A = _operator(eigenvalues)
    b = 2
    evals, evecs, info = top_eigenpairs(
        lambda X: A @ X, A.shape[0], k, dtype=F64, block_size=b, max_iter=500
    )
    max_basis = max(BASIS_BLOCKS * b, 2 * k + b)
    assert info.products > 2 * max_basis, "expected at least two restarts"
    _check_pairs(A, evals, evecs, info, TOL_FLOAT64)


def test_block_narrower_than_k():
    eigenvalues, _ = SPECTRA["decaying"]
    A = _operator(eigenvalues)
    evals, evecs, info = top_eigenpairs(
        lambda X: A @ X, A.shape[0], 7, dtype=F64, block_size=3
    )
    _check_pairs(A, evals, evecs, info, TOL_FLOAT64)


def test_rank_below_k_gives_zero_eigenvalues():
    """Rank 3 < k = 6: three exact pairs, then ~0 with orthonormal null vectors."""
    eigenvalues = torch.cat([torch.tensor([3.0, 2.0, 1.0]), torch.zeros(57)]).to(F64)
    A = _operator(eigenvalues)
    evals, evecs, info = top_eigenpairs(lambda X: A @ X, 60, 6, dtype=F64)
    _check_pairs(A, evals, evecs, info, TOL_FLOAT64)
    assert evals[3:].abs().max() <= RTOL * 3.0


def test_invariant_subspace_found_early():
    """Two distinct eigenvalues: ``span(X, A X)`` is invariant after one call."""
    eigenvalues = torch.cat([torch.full((6,), 5.0), torch.ones(94)]).to(F64)
    A = _operator(eigenvalues)
    f = _Counting(A)
    evals, evecs, info = top_eigenpairs(f, 100, 4, dtype=F64)
    _check_pairs(A, evals, evecs, info, TOL_FLOAT64)
    assert info.calls == 2


@pytest.mark.parametrize("scale", [0.0, 2.0])
def test_multiple_of_identity(scale):
    A = scale * torch.eye(50, dtype=F64)
    evals, evecs, info = top_eigenpairs(lambda X: A @ X, 50, 3, dtype=F64)
    assert info.converged and info.calls == 1
    assert (evals - scale).abs().max() <= RTOL * max(scale, 1.0)
    assert (evecs.T @ evecs - torch.eye(3, dtype=F64)).abs().max() <= ORTH_TOL


@pytest.mark.parametrize("n, k", [(10, 4), (7, 7), (1, 1)])
def test_small_n_is_one_dense_call(n, k):
    """``block_size ≥ n`` or ``k == n``: one call with the identity, ``n`` products."""
    A = _operator(torch.linspace(1, 0.1, n, dtype=F64))
    f = _Counting(A)
    evals, evecs, info = top_eigenpairs(f, n, k, dtype=F64)
    assert f.widths == [n] and (info.calls, info.products) == (1, n)
    _check_pairs(A, evals, evecs, info, TOL_FLOAT64)


@pytest.mark.parametrize("name", list(SPECTRA))
def test_float32(name):
    eigenvalues, k = SPECTRA[name]
    A = _operator(eigenvalues.to(F64))
    f = _Counting(A)
    evals, evecs, info = top_eigenpairs(f, A.shape[0], k, dtype=torch.float32)
    assert evals.dtype == evecs.dtype == info.residuals.dtype == torch.float32
    assert set(f.dtypes) == {torch.float32}
    _check_pairs(A, evals, evecs, info, TOL_FLOAT32, RTOL_FLOAT32, ORTH_TOL_FLOAT32)


def test_counts_and_progress():
    eigenvalues, k = SPECTRA["decaying"]
    A = _operator(eigenvalues)
    f = _Counting(A)
    seen = []
    _, _, info = top_eigenpairs(f, A.shape[0], k, dtype=F64, progress=seen.append)
    assert info.calls == info.iterations == len(f.widths) > 1
    assert info.products == sum(f.widths)
    assert max(f.widths) <= max(2 * k, k + 8)  # the default block size
    assert seen == torch.tensor(f.widths).cumsum(0).tolist()


def test_max_iter_caps_the_calls():
    eigenvalues, k = SPECTRA["power_law"]
    A = _operator(eigenvalues)
    f = _Counting(A)
    _, _, info = top_eigenpairs(f, A.shape[0], k, dtype=F64, tol=1e-14, max_iter=2)
    assert len(f.widths) == info.calls == 2
    assert not info.converged
    assert info.residuals.shape == (k,)


def test_deterministic():
    eigenvalues, k = SPECTRA["clustered"]
    A = _operator(eigenvalues)

    def run(generator):
        return top_eigenpairs(lambda X: A @ X, 300, k, dtype=F64, generator=generator)

    a, b = run(None), run(None)
    c, d = (run(torch.Generator().manual_seed(7)) for _ in range(2))
    for x, y in ((a, b), (c, d)):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
        assert torch.equal(x[2].residuals, y[2].residuals)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, r"k must lie in \[1, n=5\]; got k=0"),
        ({"k": 6}, r"k must lie in \[1, n=5\]; got k=6"),
        ({"dtype": torch.float16}, "dtype must be torch.float32 or torch.float64"),
        ({"tol": 0.0}, "tol must be positive"),
        ({"block_size": 0}, "block_size must be positive"),
        ({"max_iter": 0}, "max_iter must be positive"),
        ({"k": 4, "block_size": 1, "max_iter": 3}, "raise max_iter or block_size"),
    ],
)
def test_invalid_arguments(kwargs, match):
    calls = []
    args = {"k": 2, "dtype": F64} | kwargs
    with pytest.raises(ValueError, match=match):
        top_eigenpairs(calls.append, 5, **args)
    assert not calls, "matmat was called before validation"
