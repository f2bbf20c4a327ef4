"""The GGN diagonal, trace and per-component diagonals against brute force, float64.

Every shared case (BatchNorm in train mode and the real-model re-creations included)
against ``diag(dense_ggn)``; Monte-Carlo diagonals by a statistical test with a stated
confidence; routes, strategies, sub-sampling, parameter subsets and the model's state.
"""

from __future__ import annotations

import math
import re
import warnings
from functools import lru_cache
from statistics import NormalDist

import pytest
import torch
from cases import BN_CASES, CASES, DTYPE
from test_mc_factors import _dense_pieces, _factor_matrix
from test_structure import EXPECTED_MIXING
from test_subsampling import _subset, dense_subsampled_ggn
from utils import assert_state_equal, batch_of, report_close, rho_of, state_of

import lowrank_ggn.core.engine.diagonal as engine_diagonal
from lowrank_ggn import (
    GGN,
    GGNDiagonal,
    SampleMixingWarning,
    ggn_diagonal,
    ggn_spectrum,
    ggn_trace,
    sampled_loss_hessian_factors,
)
from lowrank_ggn.core.diagonal import DiagonalRoute
from lowrank_ggn.reference import (
    dense_ggn,
    dense_jacobian,
    dense_loss_hessian_blocks,
    dense_outputs,
)

#: Tolerance of float64 diagonals against ``diag(dense_ggn)``, relative to the largest
#: entry (measured worst case over the case list: 3e-15).
RTOL_DIAG = 1e-10
CASE_BY_NAME = {c.name: c for c in [*CASES, *BN_CASES]}


@lru_cache(maxsize=None)
def _dense_diagonal(name: str) -> torch.Tensor:
    model, loss, X, y = CASE_BY_NAME[name].make()
    return torch.diagonal(dense_ggn(model, loss, X, y)).clone()


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleMixingWarning)
        return fn(*args, **kwargs)


def _check_shapes(res: GGNDiagonal, params: list[torch.Tensor]) -> None:
    assert [d.shape for d in res.per_param] == [p.shape for p in params]
    assert all(d.dtype == p.dtype for d, p in zip(res.per_param, params))
    assert res.flat.shape == (sum(p.numel() for p in params),)


# ------------------------------------------------------------------ exact diagonal
def test_diagonal_matches_dense(case):
    model, loss, X, y = case.make()
    before = state_of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SampleMixingWarning)  # sums: no warning
        res = ggn_diagonal(model, loss, X, y, chunk=5)
    assert_state_equal(before, model)
    _check_shapes(res, [p for p in model.parameters() if p.requires_grad])
    report_close(res.flat, _dense_diagonal(case.name), RTOL_DIAG, "diag(G)")
    assert res.route is DiagonalRoute.LAYERWISE and res.mc_samples is None
    assert res.path.name == ("full_batch" if case.mixing else "per_sample")


@pytest.mark.parametrize("case", BN_CASES[-7:], ids=lambda c: c.name)
def test_every_batchnorm_flavour(case):
    model, loss, X, y = case.make()
    res = ggn_diagonal(model, loss, X, y)
    report_close(res.flat, _dense_diagonal(case.name), RTOL_DIAG, "diag(G)")


ROUTE_CASES = [
    CASE_BY_NAME[n]
    for n in (
        "mlp-ce-mean",
        "cnn-pool-ce",
        "bn1d-train-ce",
        "resnet-bn-train-ce",
        "depthwise-bn-train-ce",
        "deconv-decoder-mse",
        "tied-conv1d-lm",
        "embedding-bag-ce",
    )
]


@pytest.mark.parametrize("case", ROUTE_CASES, ids=lambda c: c.name)
def test_every_strategy_and_the_streamed_route_agree(case):
    model, loss, X, y = case.make()
    expected = _dense_diagonal(case.name)
    strategies = ["bn_split", "columns"] if case.mixing else ["per_sample"]
    for strategy in strategies:
        res = ggn_diagonal(model, loss, X, y, strategy=strategy, chunk=3)
        assert res.engine_report.strategy.value == strategy
        report_close(res.flat, expected, RTOL_DIAG, f"diag(G), {strategy}")
    for options in ({"strategy": "streamed"}, {"engine": "generic"}):
        res = ggn_diagonal(model, loss, X, y, chunk=3, **options)
        assert res.route is DiagonalRoute.STREAMED
        report_close(res.flat, expected, RTOL_DIAG, f"diag(G), {options}")
        pc = _quiet(GGN(model, loss, X, y, chunk=3, **options).per_component_diagonals)
        report_close(pc.flat.sum(0), expected, RTOL_DIAG, f"Σ_n d_n, {options}")


@pytest.mark.parametrize(
    "case", [CASE_BY_NAME[n] for n in ("cnn-pool-ce", "groupnorm-mse")], ids=str
)
def test_convolution_chunks_of_one_sample_and_channel(case, monkeypatch):
    monkeypatch.setattr(engine_diagonal, "CHUNK_BYTES", 1)
    model, loss, X, y = case.make()
    res = ggn_diagonal(model, loss, X, y)
    report_close(res.flat, _dense_diagonal(case.name), RTOL_DIAG, "diag(G)")
    pc = GGN(model, loss, X, y).per_component_diagonals()
    report_close(pc.flat.sum(0), _dense_diagonal(case.name), RTOL_DIAG, "Σ_n d_n")


def test_float32_model_float32_diagonal():
    model, loss, X, y = CASE_BY_NAME["bn2d-train-ce"].make()
    res = ggn_diagonal(model.float(), loss, X.float(), y)
    assert all(d.dtype == torch.float32 for d in res.per_param)
    report_close(res.flat.double(), _dense_diagonal("bn2d-train-ce"), 1e-5, "float32")


# ------------------------------------------------------------------------- trace
def test_trace_is_the_sum_of_eigenvalues_and_the_gram_trace(case):
    model, loss, X, y = case.make()
    ggn = GGN(model, loss, X, y)
    trace = ggn.trace()  # from the diagonal: no Gram yet
    assert ggn._gram is None and trace.dim() == 0 and trace.dtype == DTYPE
    expected = _dense_diagonal(case.name).sum()
    report_close(trace, expected, RTOL_DIAG, "tr G")
    spec = ggn.spectrum()
    # unresolved eigenvalues lie at or below the threshold
    slack = spec.num_unresolved * spec.threshold + RTOL_DIAG * expected
    assert abs(spec.eigenvalues.sum() - trace) <= slack
    report_close(ggn.gram().trace(), trace, RTOL_DIAG, "tr 𝒢")
    report_close(ggn.trace(), trace, RTOL_DIAG, "tr G from the cached Gram")
    report_close(ggn_trace(model, loss, X, y), trace, RTOL_DIAG, "ggn_trace")


# ----------------------------------------------------------- per-component rows
@lru_cache(maxsize=None)
def _dense_components(name: str) -> torch.Tensor:
    """``d_n = diag(J_nᵀ ∇²_{F_n}L J_n)`` ``[N, D]`` from the whole-batch Jacobian."""
    model, loss, X, y = CASE_BY_NAME[name].make()
    J = dense_jacobian(model, X)  # [N, *out, D]
    H = dense_loss_hessian_blocks(loss, dense_outputs(model, X), y)  # [N, O, O]
    J = J.reshape(H.shape[0], H.shape[1], -1)
    return torch.einsum("nod,nop,npd->nd", J, H, J)


def test_per_component_diagonals(case):
    model, loss, X, y = case.make()
    before = state_of(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SampleMixingWarning)
        res = GGN(model, loss, X, y, chunk=4).per_component_diagonals()
    assert_state_equal(before, model)
    assert len([w for w in caught if w.category is SampleMixingWarning]) == int(
        case.mixing
    )
    N = batch_of(X)
    params = [p for p in model.parameters() if p.requires_grad]
    assert [r.shape for r in res.per_param] == [(N, *p.shape) for p in params]
    assert torch.equal(res.sample_index, torch.arange(N))
    report_close(res.flat, _dense_components(case.name), RTOL_DIAG, "d_n")
    report_close(res.flat.sum(0), _dense_diagonal(case.name), RTOL_DIAG, "Σ_n d_n")
    report_close(res.diagonal.flat, _dense_diagonal(case.name), RTOL_DIAG, "diag")
    assert res.rho == rho_of(loss, N)
    assert res.sample_mixing == case.mixing
    assert res.mixing_modules == EXPECTED_MIXING.get(case.name, ())
    text = "per-component diagonal" if case.mixing else "sample n's own GGN"
    assert text in res.explanation


@pytest.mark.parametrize("case", BN_CASES[:3], ids=lambda c: c.name)
def test_warning_says_the_rows_are_per_component(case):
    model, loss, X, y = case.make()
    name = ", ".join(EXPECTED_MIXING[case.name])
    with pytest.warns(SampleMixingWarning, match=re.escape(f"module(s) {name} mix")):
        res = GGN(model, loss, X, y).per_component_diagonals()
    assert res.sample_mixing and name in res.explanation


# ------------------------------------------------------------------- Monte-Carlo
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


MC_CASES = [
    CASE_BY_NAME[n]
    for n in ("mlp-ce-mean", "mlp-mse-sum", "mlp-bce-mean", "bn2d-train-ce")
]


@pytest.mark.parametrize("case", MC_CASES, ids=lambda c: c.name)
def test_mc_diagonal_is_exact_for_its_draw(case):
    """The GGN's own MC factors: ``Σ_m (J_nᵀ s̃_nm)²`` of that draw, and the Gram's trace."""
    model, loss, X, y = case.make()
    ggn = GGN(model, loss, X, y, mc_samples=3, generator=_gen(7))
    res = ggn.diagonal()
    assert res.mc_samples == 3 and res.num_columns == 3 * batch_of(X)
    out, J = _dense_pieces(model, loss, X)
    V = J.T @ _factor_matrix(sampled_loss_hessian_factors(loss, out, y, 3, _gen(7)))
    report_close(res.flat, V.square().sum(1), RTOL_DIAG, "MC diag")
    report_close(ggn.diagonal(mc_samples=3).flat, res.flat, 0.0, "same draw")
    report_close(ggn.gram().trace(), res.trace, RTOL_DIAG, "tr 𝒢̃")
    pc = _quiet(ggn.per_component_diagonals)
    report_close(pc.flat.sum(0), res.flat, RTOL_DIAG, "Σ_n d̃_n")


#: Independent Monte-Carlo diagonals per case for the unbiasedness test.
DRAWS = 400
#: Probability that a correct estimator fails the test of one case (under the CLT),
#: split over the ``D`` entries (Bonferroni): each entry's mean lies within
#: ``Z·σ̂/√DRAWS`` of the exact entry, ``Z = Φ⁻¹(1 − FAMILY_ALPHA / (2D))``.
FAMILY_ALPHA = 1e-3


@pytest.mark.parametrize("case", MC_CASES, ids=lambda c: c.name)
def test_mc_diagonal_is_unbiased(case):
    model, loss, X, y = case.make()
    ggn = GGN(model, loss, X, y)
    gen = _gen(0)
    draws = torch.stack(
        [ggn.diagonal(mc_samples=1, generator=gen).flat for _ in range(DRAWS)]
    )
    exact = _dense_diagonal(case.name)
    z = NormalDist().inv_cdf(1 - FAMILY_ALPHA / (2 * exact.numel()))
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(DRAWS)
    err = (mean - exact).abs()
    bound = z * se + RTOL_DIAG * exact.max()
    worst = (err / bound).argmax()
    assert (err <= bound).all(), (
        f"entry {worst}: MC mean {mean[worst]:.6e} ± {se[worst]:.2e} (z = {z:.2f}) "
        f"vs exact {exact[worst]:.6e}"
    )
    # the draws differ: a fresh draw per call
    assert (draws[0] - draws[1]).abs().max() > 1e-6 * exact.max()
    # a fresh draw is reproducible from its generator
    again = ggn.diagonal(mc_samples=2, generator=_gen(5)).flat
    report_close(ggn.diagonal(mc_samples=2, generator=_gen(5)).flat, again, 0.0)


# ------------------------------------------------- sub-sampling and parameters
SUBSET_CASES = [
    CASE_BY_NAME[n]
    for n in ("mlp-ce-mean", "mlp-bce-sum", "cnn-pool-ce", "bn1d-train-ce")
    + ("resnet-bn-train-ce", "transformer-mask-ce", "segmentation-ce-sum")
]


@pytest.mark.parametrize("case", SUBSET_CASES, ids=lambda c: c.name)
def test_subsampled_diagonal(case):
    model, loss, X, y = case.make()
    index = _subset(batch_of(X))
    G = dense_subsampled_ggn(model, loss, X, y, index)
    ggn = GGN(model, loss, X, y, subsampling=index)
    report_close(ggn.diagonal().flat, torch.diagonal(G), RTOL_DIAG, "diag(G_S)")
    pc = _quiet(ggn.per_component_diagonals)
    assert torch.equal(pc.sample_index, torch.tensor(index))
    assert pc.flat.shape[0] == len(index)
    report_close(pc.flat.sum(0), torch.diagonal(G), RTOL_DIAG, "Σ_{n∈S} d_n")


@pytest.mark.parametrize("case", SUBSET_CASES, ids=lambda c: c.name)
def test_parameter_subset(case):
    model, loss, X, y = case.make()
    params = [p for p in model.parameters() if p.requires_grad][::-2]
    expected = torch.diagonal(dense_ggn(model, loss, X, y, params=params))
    res = ggn_diagonal(model, loss, X, y, params=params)
    _check_shapes(res, params)
    report_close(res.flat, expected, RTOL_DIAG, "diag(G), params subset")


# ------------------------------------------------------------ state and errors
def test_changed_model_is_refused_and_state_kept():
    model, loss, X, y = CASE_BY_NAME["bn1d-train-ce"].make()
    ggn = GGN(model, loss, X, y)
    ggn.diagonal()
    before = state_of(model)
    _quiet(ggn.per_component_diagonals)
    ggn.trace(mc_samples=1, generator=_gen(1))
    assert_state_equal(before, model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    for method in (ggn.diagonal, ggn.trace, ggn.per_component_diagonals):
        with pytest.raises(RuntimeError, match="changed since this GGN was created"):
            method()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mc_samples": 0}, ValueError, "positive int"),
        ({"mc_samples": 1.5}, ValueError, "positive int"),
        ({"mc_samples": 2, "generator": 3}, TypeError, "torch.Generator"),
        ({"generator": torch.Generator()}, ValueError, "only used with mc_samples"),
    ],
)
def test_bad_mc_arguments(kwargs, error, match):
    model, loss, X, y = CASES[0].make()
    ggn = GGN(model, loss, X, y)
    for method in (ggn.diagonal, ggn.trace):
        with pytest.raises(error, match=match):
            method(**kwargs)
    with pytest.raises(error, match=match):
        ggn_diagonal(model, loss, X, y, **kwargs)


def test_spectrum_eigenvectors_reproduce_the_diagonal():
    """``diag(G) = Σ_k λ_k e_k²`` with every eigenpair (BatchNorm in train mode)."""
    model, loss, X, y = CASE_BY_NAME["resnet-bn-train-ce"].make()
    spec = ggn_spectrum(model, loss, X, y, eigenvectors=True)
    d = (spec.eigenvectors.square() * spec.eigenvalues[:, None]).sum(0)
    report_close(ggn_diagonal(model, loss, X, y).flat, d, 1e-8, "Σ λ e²")
