"""Curvature sub-sampling against the brute-force ``κ J_Sᵀ H_SS J_S``, all cases."""

from __future__ import annotations

import pytest
import torch
from cases import CASES
from utils import (
    RTOL,
    assert_spectrum_matches,
    assert_state_equal,
    batch_of,
    reduction_of,
    report_close,
    state_of,
)

from lowrank_ggn import ggn_spectrum, gram_matrix
from lowrank_ggn.reference import (
    dense_jacobian,
    dense_output_hessian,
    dense_outputs,
)


def _subset(N: int) -> list[int]:
    """A proper subset in non-sorted order (all of a batch of one)."""
    return [N - 1, 0] if N > 2 else [N - 1]


def dense_subsampled_ggn(model, loss, X, y, index) -> torch.Tensor:
    """``κ J_Sᵀ H_SS J_S`` from the whole-batch Jacobian and output Hessian."""
    out = dense_outputs(model, X)
    N = out.shape[0]
    n_out = out[0].numel()
    J = (
        dense_jacobian(model, X)
        .reshape(N, n_out, -1)[index]
        .reshape(len(index) * n_out, -1)
    )
    H = dense_output_hessian(loss, out, y).reshape(N, n_out, N, n_out)
    H_SS = H[index][:, :, index].reshape(len(index) * n_out, len(index) * n_out)
    kappa = N / len(index) if reduction_of(loss) == "mean" else 1.0
    G = kappa * J.T @ H_SS @ J
    return 0.5 * (G + G.T)


def test_subsampled_spectrum_matches_dense(case):
    model, loss, X, y = case.make()
    index = _subset(batch_of(X))
    before = state_of(model)
    res = ggn_spectrum(model, loss, X, y, subsampling=index, eigenvectors=True)
    assert_state_equal(before, model)
    G = dense_subsampled_ggn(model, loss, X, y, index)
    assert res.num_columns == len(index) * (res.num_columns // len(index))
    assert_spectrum_matches(res.eigenvalues, G)
    E, lam = res.eigenvectors, res.eigenvalues
    residual = (G @ E.T - E.T * lam).norm(dim=0)
    assert residual.max() <= RTOL * lam[0], f"‖G e − λ e‖ = {residual.max():.3e}"
    K = gram_matrix(model, loss, X, y, subsampling=torch.tensor(index))
    report_close(K.trace(), G.trace(), name="trace")


def test_full_subset_is_a_permutation_of_the_exact_gram():
    model, loss, X, y = CASES[10].make()  # bn1d-train-ce
    N = X.shape[0]
    perm = list(range(N))[::-1]
    K = gram_matrix(model, loss, X, y)
    Ks = gram_matrix(model, loss, X, y, subsampling=perm)
    C = K.shape[0] // N
    rows = torch.tensor([n * C + c for n in perm for c in range(C)])
    report_close(Ks, K[rows][:, rows], name="permuted Gram")


def test_batchnorm_subset_is_not_the_sub_batch_ggn():
    """Under train-mode BN the forward pass (statistics) uses all N samples."""
    model, loss, X, y = CASES[10].make()
    index = [0, 2, 4]
    sub = ggn_spectrum(model, loss, X, y, subsampling=index).eigenvalues
    alone = ggn_spectrum(model, loss, X[index], y[index]).eigenvalues
    G = dense_subsampled_ggn(model, loss, X, y, index)
    assert_spectrum_matches(sub, G)
    assert (sub[: alone.numel()] - alone[: sub.numel()]).abs().max() > 1e-3 * sub[0]


@pytest.mark.parametrize(
    ("indices", "error", "match"),
    [
        ([], ValueError, "empty"),
        ([0, 6], ValueError, r"lie in \[0, 6\)"),
        ([-1], ValueError, r"lie in \[0, 6\)"),
        ([1, 1], ValueError, "repeats"),
        ([0.5], TypeError, "ints"),
        ([True], TypeError, "ints"),
        (torch.tensor([1.0]), TypeError, "integer"),
        (torch.tensor([[0, 1]]), ValueError, "1-d"),
        (3, TypeError, "sequence"),
    ],
)
def test_bad_indices_are_rejected(indices, error, match):
    model, loss, X, y = CASES[0].make()
    with pytest.raises(error, match=match):
        gram_matrix(model, loss, X, y, subsampling=indices)
