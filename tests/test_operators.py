"""The GGN and Gram ``LinearOperator``s against the dense GGN and ``gram_matrix``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import CASES
from scipy.sparse.linalg import LinearOperator, aslinearoperator, cg, eigsh
from utils import RTOL, assert_state_equal, report_close, state_of

from lowrank_ggn import ggn_linear_operator, gram_linear_operator, gram_matrix
from lowrank_ggn.reference import dense_ggn

#: float32 products against the float64 dense GGN (round-off of ~D·eps32).
FLOAT32_RTOL = 1e-5


def _close(actual: np.ndarray, expected: torch.Tensor, name: str) -> None:
    report_close(torch.as_tensor(actual), expected, name=name)


def test_ggn_operator_products_match_dense(case):
    model, loss, X, y = case.make()
    G = dense_ggn(model, loss, X, y)
    before = state_of(model)
    op = ggn_linear_operator(model, loss, X, y, chunk=2)
    rng = np.random.default_rng(0)
    v, V = rng.standard_normal(G.shape[0]), rng.standard_normal((G.shape[0], 3))
    assert isinstance(op, LinearOperator) and op.shape == G.shape
    assert op.dtype == np.float64
    _close(op @ v, G @ torch.as_tensor(v), "G v")
    _close(op @ V, G @ torch.as_tensor(V), "G V")
    _close(op.T @ v, G @ torch.as_tensor(v), "Gᵀ v")
    assert_state_equal(before, model)


def test_gram_operator_matches_gram_matrix(case):
    model, loss, X, y = case.make()
    K = gram_matrix(model, loss, X, y)
    op = gram_linear_operator(model, loss, X, y)
    U = np.random.default_rng(1).standard_normal((K.shape[0], 2))
    assert op.shape == K.shape
    _close(op @ U, K @ torch.as_tensor(U), "𝒢 U")


@pytest.mark.parametrize(
    "kwargs",
    [{"subsampling": [3, 1]}, {"mc_samples": 2}],
    ids=["subsampling", "mc"],
)
def test_operators_honour_approximations(kwargs):
    model, loss, X, y = next(c for c in CASES if c.name == "bn1d-train-ce").make()

    def opts():  # a fresh generator for every call: same draws
        extra = (
            {"generator": torch.Generator().manual_seed(5)}
            if "mc_samples" in kwargs
            else {}
        )
        return {**kwargs, **extra}

    K = gram_matrix(model, loss, X, y, **opts())
    op = gram_linear_operator(model, loss, X, y, **opts())
    _close(op @ np.eye(K.shape[0]), K, "𝒢")
    ggn = ggn_linear_operator(model, loss, X, y, **opts())
    assert np.isclose(np.trace(ggn @ np.eye(ggn.shape[0])), K.trace().item(), rtol=RTOL)


def test_eigsh_and_cg_on_the_ggn_operator():
    model, loss, X, y = next(c for c in CASES if c.name == "bn2d-train-ce").make()
    G = dense_ggn(model, loss, X, y)
    op = ggn_linear_operator(model, loss, X, y)
    evals = np.sort(eigsh(op, k=3, which="LA", tol=1e-12)[0])[::-1]
    _close(evals.copy(), torch.linalg.eigvalsh(G).flip(0)[:3], "eigsh")
    damping = 1e-2 * torch.linalg.eigvalsh(G)[-1].item()
    b = np.random.default_rng(2).standard_normal(G.shape[0])
    A = op + damping * aslinearoperator(np.eye(G.shape[0]))
    x, info = cg(A, b, rtol=1e-12, maxiter=1000)
    assert info == 0
    expected = torch.linalg.solve(
        G + damping * torch.eye(G.shape[0], dtype=G.dtype), torch.as_tensor(b)
    )
    report_close(torch.as_tensor(x), expected, rtol=1e-8, name="cg")


def test_operator_is_frozen_at_creation():
    model, loss, X, y = next(c for c in CASES if c.name == "bn1d-train-ce").make()
    G = dense_ggn(model, loss, X, y)
    op = ggn_linear_operator(model, loss, X, y)
    v = np.random.default_rng(3).standard_normal(G.shape[0])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # an "optimizer step" after creation
    X.mul_(2.0)
    model.eval()
    before = state_of(model)
    _close(op @ v, G @ torch.as_tensor(v), "G v after changes")
    assert_state_equal(before, model)


def test_float32_model_accepts_float64_vectors():
    model, loss, X, y = CASES[0].make()
    model, X = model.float(), X.float()
    op = ggn_linear_operator(model, loss, X, y)
    assert op.dtype == np.float32
    out = op @ np.ones(op.shape[0], dtype=np.float64)
    assert out.dtype == np.float32
    G = dense_ggn(model.double(), loss, X.double(), y)
    report_close(
        torch.as_tensor(out).double(), G.sum(1), rtol=FLOAT32_RTOL, name="float32"
    )
