"""The Gram matrix against the dense reference, over the shared case list."""

from __future__ import annotations

import pytest
import torch
from utils import assert_spectrum_matches, report_close

from lowrank_ggn import gram_matrix
from lowrank_ggn.core.loss_factors import loss_hessian_factors
from lowrank_ggn.reference import dense_ggn, dense_jacobian, dense_outputs


def test_gram_equals_factor_jacobian_product(case):
    """``𝒢 = (Jᵀ S)ᵀ (Jᵀ S)`` entry by entry, with ``J`` from ``torch.func`` on the whole batch."""
    model, loss, X, y = case.make()
    K = gram_matrix(model, loss, X, y)
    out = dense_outputs(model, X)
    S = loss_hessian_factors(loss, out, y)  # [C, N, *out]
    C, N = S.shape[:2]
    J = dense_jacobian(model, X).reshape(out.numel(), -1)  # [N·O, D]
    # column (n, c) of the factor matrix: S[c] placed at sample n only
    Smat = torch.zeros(N, C, out.numel(), dtype=out.dtype)
    n_out = out[0].numel()
    for n in range(N):
        Smat[n, :, n * n_out : (n + 1) * n_out] = S[:, n].reshape(C, n_out)
    V = J.T @ Smat.reshape(N * C, -1).T  # [D, N·C]
    report_close(K, V.T @ V, name="Gram")


def test_gram_spectrum_and_trace(case):
    model, loss, X, y = case.make()
    K = gram_matrix(model, loss, X, y)
    G = dense_ggn(model, loss, X, y)
    report_close(K.trace(), G.trace(), name="trace")
    evals = torch.linalg.eigvalsh(K).flip(0)
    evals = evals[evals > 1e-10 * evals[0]]
    assert_spectrum_matches(evals, G)


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunk_size_does_not_change_result(chunk):
    from cases import CASES

    for case in (CASES[0], next(c for c in CASES if c.mixing)):
        model, loss, X, y = case.make()
        report_close(
            gram_matrix(model, loss, X, y, chunk=chunk), gram_matrix(model, loss, X, y)
        )


def test_params_subset_and_order():
    from cases import CASES

    model, loss, X, y = next(c for c in CASES if c.name == "bn1d-train-ce").make()
    params = [model[3].weight, model[0].bias]
    K = gram_matrix(model, loss, X, y, params=params)
    G = dense_ggn(model, loss, X, y, params=params)
    assert G.shape == (3 * 5 + 5,) * 2
    report_close(K.trace(), G.trace(), name="trace")


def test_frozen_parameters_are_excluded_by_default():
    from cases import CASES

    model, loss, X, y = CASES[0].make()
    model[0].weight.requires_grad_(False)
    K = gram_matrix(model, loss, X, y)
    G = dense_ggn(model, loss, X, y)
    assert G.shape[0] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    report_close(K.trace(), G.trace(), name="trace")
