"""Monte-Carlo loss-Hessian factors: exact engine given the draws, unbiased, convergent.

Statistical tests use fixed seeds (deterministic), with criteria chosen so that a
correct sampler passes with stated probability under the central limit theorem.
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import CASES
from utils import RTOL, assert_state_equal, report_close, state_of

from lowrank_ggn import ggn_spectrum, gram_matrix, sampled_loss_hessian_factors
from lowrank_ggn.reference import (
    dense_ggn,
    dense_jacobian,
    dense_output_hessian,
    dense_outputs,
)

#: Allowed deviation of the MC mean from the exact trace, in standard errors. Under
#: the CLT a correct sampler fails with probability 2·Φ(−4) ≈ 6e-5 per case.
Z_SCORE = 4.0
#: Independent draws (seeds) for the unbiasedness test.
DRAWS = 100


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _factor_matrix(S: torch.Tensor) -> torch.Tensor:
    """Columns ``e_n ⊗ s_nm`` of ``S`` ``[M, N, *out]`` as ``[N·O, N·M]``, sample-major."""
    M, N = S.shape[:2]
    n_out = S[0, 0].numel()
    Smat = torch.zeros(N, M, N * n_out, dtype=S.dtype)
    for n in range(N):
        Smat[n, :, n * n_out : (n + 1) * n_out] = S[:, n].reshape(M, n_out)
    return Smat.reshape(N * M, N * n_out).T


def _dense_pieces(model, loss, X):
    out = dense_outputs(model, X)
    J = dense_jacobian(model, X).reshape(out.numel(), -1)  # [N·n_out, D]
    return out, J


def test_mc_gram_is_exact_for_the_drawn_factors(case):
    """With the same seed, the engine's Gram is ``(Jᵀ S̃)ᵀ (Jᵀ S̃)``, BN train included."""
    model, loss, X, y = case.make()
    before = state_of(model)
    K = gram_matrix(model, loss, X, y, mc_samples=3, generator=_gen(7))
    assert_state_equal(before, model)
    out, J = _dense_pieces(model, loss, X)
    S = sampled_loss_hessian_factors(loss, out, y, 3, _gen(7))
    assert S.shape == (3, *out.shape)
    V = J.T @ _factor_matrix(S)  # [D, N·M]
    assert K.shape == (3 * out.shape[0],) * 2
    report_close(K, V.T @ V, name="MC Gram")


def test_same_seed_same_result_other_seed_differs():
    model, loss, X, y = CASES[14].make()  # bn2d-train-ce
    a = ggn_spectrum(model, loss, X, y, mc_samples=2, generator=_gen(1))
    b = ggn_spectrum(model, loss, X, y, mc_samples=2, generator=_gen(1))
    c = ggn_spectrum(model, loss, X, y, mc_samples=2, generator=_gen(2))
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    assert torch.equal(a.gram_eigenvectors, b.gram_eigenvectors)
    k = min(a.rank, c.rank)
    assert (a.eigenvalues[:k] - c.eigenvalues[:k]).abs().max() > 1e-3 * a.eigenvalues[0]


#: One case per loss, reduction and output layout (the draws do not depend on J).
UNBIASED_CASES = [
    c
    for c in CASES
    if c.name
    in (
        "mlp-ce-mean",
        "mlp-mse-sum",
        "mlp-bce-mean",
        "bn1d-train-ce",
        "segmentation-ce-sum",
        "tied-conv1d-lm",  # cross-entropy over positions, classes last
    )
]


@pytest.mark.parametrize("case", UNBIASED_CASES, ids=lambda c: c.name)
def test_mc_trace_is_unbiased(case):
    """Mean of ``tr G̃`` over DRAWS seeds is within Z_SCORE standard errors of ``tr G``."""
    model, loss, X, y = case.make()
    out, J = _dense_pieces(model, loss, X)
    exact = torch.trace(J.T @ dense_output_hessian(loss, out, y) @ J).item()
    Jn = J.reshape(out.shape[0], -1, J.shape[-1])  # [N, O, D]
    traces = torch.stack(
        [
            torch.einsum("nod,mno->mnd", Jn, S.flatten(2)).square().sum()
            for S in (
                sampled_loss_hessian_factors(loss, out, y, 1, _gen(s))
                for s in range(DRAWS)
            )
        ]
    )
    mean, se = traces.mean().item(), traces.std().item() / math.sqrt(DRAWS)
    assert abs(mean - exact) <= Z_SCORE * se + RTOL * abs(exact), (
        f"MC trace {mean:.6e} ± {se:.2e} vs exact {exact:.6e}"
    )


CONVERGENCE_CASES = [
    c
    for c in CASES
    if c.name
    in ("mlp-bce-sum", "mlp-mse-mean", "bn1d-train-ce", "segmentation-ce-mean")
]
SAMPLES = [4, 16, 64, 256, 1024]
SEEDS = 4


@pytest.mark.parametrize("case", CONVERGENCE_CASES, ids=lambda c: c.name)
def test_large_m_approaches_the_exact_ggn(case):
    """Relative error ``‖G̃_M − G‖_F / ‖G‖_F`` decays like ``1/√M``.

    Criterion: the least-squares slope of ``log mean error`` against ``log M`` over
    ``M ∈ {4, …, 1024}`` (SEEDS seeds each) lies in ``[−0.65, −0.35]`` (theory:
    ``−0.5``, since ``E‖G̃_M − G‖²_F = E‖G̃_1 − G‖²_F / M``), and the error at
    ``M = 1024`` is at most twice its ``1/√M`` extrapolation from ``M = 4``.
    """
    model, loss, X, y = case.make()
    G = dense_ggn(model, loss, X, y)
    out, J = _dense_pieces(model, loss, X)
    errors = []
    for M in SAMPLES:
        err = 0.0
        for s in range(SEEDS):
            V = J.T @ _factor_matrix(
                sampled_loss_hessian_factors(loss, out, y, M, _gen(s))
            )
            err += ((V @ V.T - G).norm() / G.norm()).item() / SEEDS
        errors.append(err)
    logm = torch.tensor(SAMPLES, dtype=torch.float64).log()
    loge = torch.tensor(errors, dtype=torch.float64).log()
    slope = ((logm - logm.mean()) * (loge - loge.mean())).sum() / (
        (logm - logm.mean()).square().sum()
    )
    assert -0.65 <= slope <= -0.35, f"slope {slope:.3f}, errors {errors}"
    assert errors[-1] <= 2 * errors[0] * math.sqrt(SAMPLES[0] / SAMPLES[-1]), errors


#: Entrywise z-score for the factor test; with ~300 entries a correct sampler fails
#: with probability below 300 · 2Φ(−5) ≈ 2e-4 under the CLT.
Z_ENTRY = 5.0


@pytest.mark.parametrize(
    ("loss", "probs"),
    [
        (torch.nn.CrossEntropyLoss(), True),
        (torch.nn.CrossEntropyLoss(reduction="sum"), False),
        (torch.nn.BCEWithLogitsLoss(), False),
        (torch.nn.MSELoss(reduction="sum"), False),
    ],
    ids=["ce-probs-spatial", "ce-index-spatial", "bce", "mse"],
)
def test_sampled_factors_are_unbiased_entrywise(loss, probs):
    """``M·s̃_m s̃_mᵀ`` averaged over M draws matches ``∇²_F L`` within Z_ENTRY SE."""
    gen = _gen(0)
    out = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    if isinstance(loss, torch.nn.CrossEntropyLoss):
        y = (
            torch.rand(out.shape, generator=gen, dtype=out.dtype)
            if probs
            else torch.randint(0, 3, (2, 2, 2), generator=gen)
        )
    else:
        y = torch.rand(out.shape, generator=gen, dtype=out.dtype)
    M = 4000
    S = sampled_loss_hessian_factors(loss, out, y, M, _gen(1)).flatten(2)  # [M, N, O]
    draws = M * torch.einsum("mno,mnp->mnop", S, S)  # one-draw estimates
    mean, se = draws.mean(0), draws.std(0) / M**0.5
    H = dense_output_hessian(loss, out, y).reshape(2, 12, 2, 12)
    H = torch.stack([H[n, :, n] for n in range(2)])  # per-sample blocks [N, O, O]
    err = (mean - H).abs()
    assert (err <= Z_ENTRY * se + RTOL * H.abs().max()).all(), err.max()


def test_rademacher_is_exact_for_one_output():
    """MSE with one output: ``z² = 1``, so every draw gives the exact GGN."""
    model, loss, X, y = next(c for c in CASES if c.name == "mlp-mse-C1").make()
    res = ggn_spectrum(model, loss, X, y, mc_samples=1, generator=_gen(3))
    report_close(res.eigenvalues, ggn_spectrum(model, loss, X, y).eigenvalues)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mc_samples": 0}, ValueError, "positive int"),
        ({"mc_samples": 2.0}, ValueError, "positive int"),
        ({"mc_samples": True}, ValueError, "positive int"),
        ({"mc_samples": 2, "generator": 3}, TypeError, "torch.Generator"),
        ({"generator": torch.Generator()}, ValueError, "only used with mc_samples"),
    ],
)
def test_bad_mc_arguments(kwargs, error, match):
    model, loss, X, y = CASES[0].make()
    with pytest.raises(error, match=match):
        ggn_spectrum(model, loss, X, y, **kwargs)
