"""Softmax cross-entropy's ``K − 1`` factor columns (``core.diagonal.fewer_columns``).

The refactored columns carry the same per-sample loss Hessian ``H_n = S_n S_nᵀ`` to
round-off, so the diagonal keeps its value with one backward pass fewer; every loss
or factor without the structure is left as it is.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from cases import BN_CASES, CASES
from utils import batch_of, report_close

from lowrank_ggn import GGN, ggn_diagonal
from lowrank_ggn.core.diagonal import fewer_columns
from lowrank_ggn.reference import dense_ggn

#: Per-sample Hessians and diagonals in float64, relative to the largest entry
#: (measured worst case: 1e-15).
RTOL = 1e-12
CASE_BY_NAME = {c.name: c for c in [*CASES, *BN_CASES]}


def _hessians(S: torch.Tensor) -> torch.Tensor:
    """``H_n = Σ_c s_nc s_ncᵀ`` ``[N, K, K]`` of factors ``[C, N, K]``."""
    return torch.einsum("cni,cnj->nij", S, S)


def _linearization(name: str, **options):
    model, loss, X, y = CASE_BY_NAME[name].make()
    return GGN(model, loss, X, y, **options).linearization


@pytest.mark.parametrize("name", ["mlp-ce-mean", "mlp-ce-sum", "cnn-pool-ce"])
def test_same_hessians_with_one_column_fewer(name):
    lin = _linearization(name)
    fewer = fewer_columns(lin)
    C, K = lin.factors.shape[0], lin.factors.shape[-1]
    assert fewer.factors.shape == (K - 1, *lin.factors.shape[1:])
    assert fewer.num_columns == lin.num_samples * (C - 1)
    report_close(_hessians(fewer.factors), _hessians(lin.factors), RTOL, "H_n")


def test_monte_carlo_columns_with_as_many_draws_as_classes():
    lin = _linearization("mlp-ce-mean", mc_samples=4)  # e_ŷ − p ⊥ 1 as well
    fewer = fewer_columns(lin)
    assert fewer.num_columns_per_sample == lin.factors.shape[-1] - 1
    report_close(_hessians(fewer.factors), _hessians(lin.factors), RTOL, "H̃_n")


@pytest.mark.parametrize(
    "name, options",
    [
        ("mlp-mse-mean", {}),  # full-rank Hessian
        ("mlp-bce-mean", {}),
        ("segmentation-ce-mean", {}),  # classes over positions: outputs [N, K, *pos]
        ("mlp-ce-mean", {"mc_samples": 1}),  # fewer columns than classes already
    ],
)
def test_other_factors_unchanged(name, options):
    lin = _linearization(name, **options)
    assert fewer_columns(lin) is lin


def test_factors_not_orthogonal_to_ones_unchanged():
    lin = _linearization("mlp-ce-mean")
    skewed = replace(lin, factors=lin.factors + 1e-3)
    assert fewer_columns(skewed) is skewed


def test_backward_passes_and_reported_columns():
    model, loss, X, y = CASE_BY_NAME["cnn-pool-ce"].make()
    res = ggn_diagonal(model, loss, X, y)
    K = GGN(model, loss, X, y).linearization.outputs.shape[1]
    assert res.engine_report.passes["backward"] == K - 1
    assert res.num_columns == K * batch_of(X)  # the GGN's own factorisation
    expected = torch.diagonal(dense_ggn(model, loss, X, y))
    report_close(res.flat, expected, RTOL, "diag(G)")


def test_bn_train_exact_with_fewer_columns():
    model, loss, X, y = CASE_BY_NAME["bn2d-train-ce"].make()
    res = ggn_diagonal(model, loss, X, y)
    assert res.engine_report.strategy.value == "bn_split"
    K = GGN(model, loss, X, y).linearization.outputs.shape[1]
    assert res.engine_report.passes["backward"] == K - 1
    expected = torch.diagonal(dense_ggn(model, loss, X, y))
    report_close(res.flat, expected, RTOL, "diag(G)")
