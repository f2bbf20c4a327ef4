r"""Top eigenpairs of a symmetric PSD operator known only through block products.

:func:`top_eigenpairs` runs a thick-restarted block Lanczos method with full
reorthogonalisation. The basis ``Q`` ``[n, m]`` grows one block per ``matmat`` call
(block Lanczos, Golub & Underwood, "The block Lanczos method for computing
eigenvalues", Mathematical Software III, 1977). Every image ``A Q`` is kept, so the
projected matrix, the Ritz pairs and their residuals cost no further products:

.. math::
    T = Q^⊤ (A Q), \qquad T s_i = θ_i s_i, \qquad y_i = Q s_i, \qquad
    r_i = (A Q) s_i - θ_i y_i .

The next block is the orthonormalised part of the newest image that lies outside
the basis, ``(I − Q Qᵀ) A X``. When the basis is full, it is thick-restarted on its
top Ritz vectors and their images, ``Q ← Q S₊``, ``A Q ← (A Q) S₊``, ``T ← Θ₊``
(Wu & Simon, "Thick-restart Lanczos method for large symmetric eigenvalue problems",
SIAM J. Matrix Anal. Appl. 22(2), 2000, https://doi.org/10.1137/S0895479898334605),
again without products. One ``matmat`` call is typically a batched backward and
forward pass of a network, so blocks are wide and calls few.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lowrank_ggn.core.tolerances import BREAKDOWN_RTOL, LANCZOS_RTOL

#: The basis holds at most this many blocks before it is thick-restarted.
BASIS_BLOCKS = 8
#: Seed of the random start block when no generator is given.
SEED = 0
_FRESH_ATTEMPTS = 3  # random replacements tried before a deficient column is dropped


@dataclass
class LanczosInfo:
    r"""What :func:`top_eigenpairs` did.

    Attributes:
        iterations: Block iterations; each enlarges the basis by one block and costs
            one ``matmat`` call (restarts cost none).
        products: Single-vector operator products: the summed widths of all blocks
            passed to ``matmat``.
        calls: Number of ``matmat`` calls.
        converged: Whether every residual met ``‖A y_i − θ_i y_i‖ ≤ tol·θ₁``.
        residuals: ``[k]`` **absolute** residual norms ``‖A y_i − θ_i y_i‖`` of the
            returned pairs, from the stored products (no extra product); divide by
            the first eigenvalue for the relative residual that ``tol`` bounds.
    """

    iterations: int
    products: int
    calls: int
    converged: bool
    residuals: Tensor


def top_eigenpairs(
    matmat: Callable[[Tensor], Tensor],
    n: int,
    k: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    tol: float | None = None,
    block_size: int | None = None,
    max_iter: int = 50,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[Tensor, Tensor, LanczosInfo]:
    r"""The ``k`` largest eigenpairs of a symmetric PSD ``A`` from block products.

    Stops once ``‖A y_i − θ_i y_i‖ ≤ tol·θ₁`` for all ``i < k`` or after ``max_iter``
    block iterations (see :class:`LanczosInfo` for the counts). If ``k ≥ n`` or the
    block would span the whole space (``block_size ≥ n``), ``A`` is formed by one
    call ``matmat(I)`` and diagonalised densely. The linear algebra runs in float64
    whatever ``dtype``; ``matmat`` only ever sees ``dtype`` tensors.

    Args:
        matmat: Maps ``X`` ``[n, b]`` to ``A X`` ``[n, b]`` (``dtype``, ``device``).
        n: Order of ``A``.
        k: Number of eigenpairs, ``1 ≤ k ≤ n``.
        dtype: ``torch.float32`` or ``torch.float64``: of ``matmat``'s blocks and of
            the results.
        device: Device of ``matmat``'s blocks and of the results.
        tol: Residual tolerance relative to ``θ₁`` (default :data:`lowrank_ggn.core.tolerances.LANCZOS_RTOL`).
        block_size: Columns per ``matmat`` call (default ``min(n, max(2k, k + 8))``);
            the basis is thick-restarted at ``BASIS_BLOCKS·block_size`` columns
            (at least ``2k + block_size``) on the top half of its Ritz vectors.
        max_iter: Maximum number of block iterations (``matmat`` calls).
        generator: Source of the random start block and of replacement directions
            (default: a CPU generator seeded with :data:`SEED`, so results are
            deterministic).
        progress: Called with the cumulative number of products after each call.

    Returns:
        ``(eigenvalues, eigenvectors, info)``: eigenvalues ``[k]`` in descending
        order (zero ones at rounding level), eigenvectors ``[n, k]`` with
        orthonormal columns, and :class:`LanczosInfo`.

    Raises:
        ValueError: For ``k`` outside ``[1, n]``, a ``dtype`` other than float32 or
            float64, or non-positive ``tol``, ``block_size`` or ``max_iter``.

    Example:
        >>> g = torch.Generator().manual_seed(1)
        >>> f64 = torch.float64
        >>> U, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=f64))
        >>> A = U @ torch.diag(torch.logspace(0, -8, 300, dtype=f64)) @ U.T
        >>> evals, evecs, info = top_eigenpairs(lambda X: A @ X, 300, 5, dtype=f64)
        >>> assert info.converged
        >>> assert torch.allclose(evals, torch.linalg.eigvalsh(A).flip(0)[:5])
        >>> assert torch.allclose(evecs.T @ evecs, torch.eye(5, dtype=f64))
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64; got {dtype}.")
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, n={n}]; got k={k}. Ask for k ≥ 1 pairs.")
    if tol is None:
        tol = LANCZOS_RTOL.get(dtype, LANCZOS_RTOL[torch.float32])
    b = min(n, max(2 * k, k + 8)) if block_size is None else min(n, block_size)
    for name, value in (("tol", tol), ("block_size", b), ("max_iter", max_iter)):
        if not value > 0:
            raise ValueError(f"{name} must be positive; got {value}.")
    if max_iter * b < k:
        raise ValueError(
            f"max_iter·block_size = {max_iter * b} < k = {k}: the basis could not "
            "hold k vectors; raise max_iter or block_size."
        )
    gen = torch.Generator().manual_seed(SEED) if generator is None else generator
    work = {"dtype": torch.float64, "device": torch.device(device)}
    info = LanczosInfo(0, 0, 0, False, torch.zeros(0))

    def apply(X: Tensor) -> Tensor:
        AX = matmat(X.to(dtype)).to(**work)
        info.iterations, info.calls = info.iterations + 1, info.calls + 1
        info.products += X.shape[1]
        if progress is not None:
            progress(info.products)
        return AX

    if k >= n or b >= n:  # dense fallback: A = A·I in one call
        A = apply(torch.eye(n, **work))
        theta, S = _top_ritz(A, k)
        res = (A @ S - S * theta).norm(dim=0)
        return _finish(theta, S, res, tol, info, dtype)

    # restart at max_basis columns, keeping the top half of the Ritz vectors (≥ k)
    max_basis = min(n, max(BASIS_BLOCKS * b, 2 * k + b))
    keep = min(max_basis - b, max(k + b, max_basis // 2))
    Q = torch.zeros(n, 0, **work)  # orthonormal basis [n, m]
    AQ = torch.zeros(n, 0, **work)  # its images A Q [n, m]
    T = torch.zeros(0, 0, **work)  # projection Qᵀ A Q [m, m]
    G = _gaussian(n, b, gen, work["device"])
    X = _orthonormal_block(G, Q, G.norm(dim=0), gen)
    for it in range(max_iter):
        AX = apply(X)
        # grow T by the new block's column Qᵀ A X and diagonal block Xᵀ A X
        C, D = Q.T @ AX, X.T @ AX
        T = torch.cat([torch.cat([T, C], 1), torch.cat([C.T, (D + D.T) / 2], 1)])
        Q, AQ = torch.cat([Q, X], 1), torch.cat([AQ, AX], 1)
        if Q.shape[1] < k:  # too few columns for k Ritz pairs yet
            X = _orthonormal_block(AX, Q, AX.norm(dim=0).max(), gen)
            continue
        theta, S = _top_ritz(T, Q.shape[1])
        # residuals of the top k Ritz pairs, exactly from the stored images
        Y, AY = Q @ S[:, :k], AQ @ S[:, :k]
        res = (AY - Y * theta[:k]).norm(dim=0)
        if (res <= tol * theta.abs().max()).all() or it + 1 == max_iter:
            break
        if Q.shape[1] == n:  # basis spans everything: the Ritz pairs are exact
            break
        # next block (I − QQᵀ) A X against the whole basis, then restart if full
        X = _orthonormal_block(AX, Q, AX.norm(dim=0).max(), gen)
        if X.shape[1] == 0:  # no direction left outside the basis
            break
        if Q.shape[1] + X.shape[1] > max_basis:
            Q, AQ, T = Q @ S[:, :keep], AQ @ S[:, :keep], torch.diag(theta[:keep])
    return _finish(theta[:k], Y, res, tol, info, dtype)


def _top_ritz(T: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top ``k`` eigenpairs of the symmetric ``T``, eigenvalues descending."""
    theta, S = torch.linalg.eigh((T + T.T) / 2)
    return theta.flip(0)[:k], S.flip(1)[:, :k]


def _finish(
    theta: Tensor,
    Y: Tensor,
    res: Tensor,
    tol: float,
    info: LanczosInfo,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, LanczosInfo]:
    """Cast the results to ``dtype`` and fill in the convergence report."""
    info.converged = bool((res <= tol * theta.abs().max()).all())
    info.residuals = res.to(dtype)
    return theta.to(dtype), Y.to(dtype), info


def _gaussian(n: int, b: int, gen: torch.Generator, device: torch.device) -> Tensor:
    """Standard normal ``[n, b]`` float64 block drawn from ``gen``, on ``device``."""
    return torch.randn(n, b, generator=gen, dtype=torch.float64, device=gen.device).to(
        device
    )


def _orthonormal_block(
    W: Tensor, Q: Tensor, scale: Tensor, gen: torch.Generator
) -> Tensor:
    r"""Orthonormal basis ``[n, b']`` of ``(I − Q Qᵀ) W``, deficient directions replaced.

    Classical Gram–Schmidt twice against the basis ``Q`` ``[n, m]`` ("twice is
    enough"), then QR of the block. A column whose pivot ``|R_jj|`` is at most
    :data:`BREAKDOWN_RTOL` times its scale (an invariant subspace, a rank-deficient
    ``A``) is replaced by a fresh Gaussian vector and the block is redone; after
    :data:`_FRESH_ATTEMPTS` such rounds it is dropped. The block is cut to
    ``n − m`` columns, the room left.

    Args:
        W: Candidate block ``[n, b]``.
        Q: Orthonormal basis ``[n, m]``.
        scale: Per-column (or scalar) norm against which a pivot counts as zero.
        gen: Source of replacement directions.

    Returns:
        The new orthonormal block, orthogonal to ``Q``.
    """
    n, m = Q.shape
    W = W[:, : n - m]
    scale = scale.expand(W.shape[1]).clone()
    for attempt in range(_FRESH_ATTEMPTS + 1):
        for _ in range(2):
            W = W - Q @ (Q.T @ W)
        W, R = torch.linalg.qr(W)
        bad = R.diagonal().abs() <= BREAKDOWN_RTOL * scale
        if not bad.any():
            return W
        if attempt == _FRESH_ATTEMPTS:  # no room found: keep the sound columns only
            return _orthonormal_block(W[:, ~bad], Q, torch.zeros(()), gen)
        fresh = _gaussian(n, int(bad.sum()), gen, W.device)
        W[:, bad], scale[bad] = fresh, fresh.norm(dim=0)
    return W  # unreachable
