"""Per-component gradients and their moments against brute force, float64."""

from __future__ import annotations

import re
import warnings
from functools import lru_cache

import pytest
import torch
from cases import CASES, DTYPE, MIXING_CASES, NON_MIXING_NORM_CASES
from test_structure import EXPECTED_MIXING, BatchCentering
from torch import nn
from utils import (
    RTOL,
    assert_state_equal,
    batch_of,
    reduction_of,
    report_close,
    state_of,
)

from lowrank_ggn import SampleMixingWarning, gradient_moments
from lowrank_ggn.reference import dense_gradient, dense_per_component_gradients

CASE_BY_NAME = {c.name: c for c in CASES}
NON_MIXING_CASES = [c for c in CASES if not c.mixing]


@lru_cache(maxsize=None)
def _dense(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force per-component rows ``[N, D]`` and batch gradient ``[D]``."""
    model, loss, X, y = CASE_BY_NAME[name].make()
    R = dense_per_component_gradients(model, loss, X, y)
    return R, dense_gradient(model, loss, X, y)


def _moments(name: str, **kwargs):
    """Run on a fresh copy of the case; check the state and the warning count."""
    case = CASE_BY_NAME[name]
    model, loss, X, y = case.make()
    before = state_of(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SampleMixingWarning)
        res = gradient_moments(model, loss, X, y, **kwargs)
    assert_state_equal(before, model)
    mixing_warnings = [w for w in caught if w.category is SampleMixingWarning]
    assert len(mixing_warnings) == int(case.mixing)
    return res


def _check_moments(res, R: torch.Tensor) -> None:
    """All moments of ``res`` against those of the brute-force rows ``R``."""
    U = R / res.rho
    N = U.shape[0]
    mean = U.mean(0)
    variance = (U - mean).square().mean(0)
    report_close(res.mean, mean, name="mean")
    report_close(res.second_moment, U.square().mean(0), name="second_moment")
    report_close(res.variance, variance, name="variance")
    report_close(
        res.variance, res.second_moment - res.mean.square(), name="E[u²]−E[u]²"
    )
    report_close(res.norms, U.norm(dim=1), name="norms")
    report_close(res.mean * res.rho * N, R.sum(0), name="ρ N mean")
    # the SNR is well conditioned only where the variance is above round-off
    ok = variance > RTOL * variance.max()
    report_close(res.snr[ok], mean[ok].square() / variance[ok], name="snr")
    expected_total = mean.square().sum() / variance.sum()
    if N > 1:
        report_close(res.total_snr, expected_total, name="total_snr")
    else:  # one sample: no spread, the SNR is infinite
        assert torch.isinf(res.total_snr) and torch.isinf(res.snr[mean != 0]).all()


def test_per_component_rows_and_moments_match_brute_force(case):
    R, g = _dense(case.name)
    res = _moments(case.name, per_component=True, chunk=4)  # several chunks
    report_close(res.per_component, R, name="per_component")
    report_close(res.per_component.sum(0), g, name="Σ_n r_n")
    report_close(res.gradient, g, name="gradient")
    assert res.per_component.dtype == DTYPE
    assert res.sample_mixing == case.mixing
    assert res.mixing_modules == EXPECTED_MIXING.get(case.name, ())
    _check_moments(res, R)


def test_per_sample_convention_mean_is_the_batch_gradient(case):
    """``L = ρ Σ ℓ_n`` with ρ = 1/N ('mean') or 1 ('sum'), for every loss and C."""
    model, loss, X, y = CASE_BY_NAME[case.name].make()
    res = _moments(case.name)
    g = dense_gradient(model, loss, X, y)
    N = batch_of(X)
    if reduction_of(loss) == "mean":
        assert res.rho == 1.0 / N
        report_close(res.mean, g, name="mean of u_n = batch gradient")
    else:
        assert res.rho == 1.0
        report_close(res.mean * N, g, name="sum of u_n = batch gradient")


def test_streamed_moments_one_row_at_a_time(case):
    R, g = _dense(case.name)
    res = _moments(case.name, chunk=1)
    assert res.per_component is None
    report_close(res.gradient, g, name="gradient")
    _check_moments(res, R)


@pytest.mark.parametrize("case", NON_MIXING_CASES, ids=lambda c: c.name)
def test_forced_full_batch_path_agrees(case):
    R, _ = _dense(case.name)
    res = _moments(case.name, per_component=True, path="full_batch")
    assert res.path.name == "full_batch" and not res.sample_mixing
    report_close(res.per_component, R, name="per_component")


@pytest.mark.parametrize("case", MIXING_CASES, ids=lambda c: c.name)
def test_warning_names_the_mixing_modules_once(case):
    model, loss, X, y = case.make()
    name = ", ".join(EXPECTED_MIXING[case.name])
    with pytest.warns(
        SampleMixingWarning, match=re.escape(f"module(s) {name} mix")
    ) as rec:
        res = gradient_moments(model, loss, X, y)
    assert len([w for w in rec if w.category is SampleMixingWarning]) == 1
    message = str(rec[0].message)
    assert "not a sampling variance" in message and "per-component" in message
    assert "sum to the batch gradient" in message
    assert res.sample_mixing and name in res.explanation
    assert "per-component" in res.explanation


@pytest.mark.parametrize("case", NON_MIXING_NORM_CASES, ids=lambda c: c.name)
def test_no_warning_for_sample_independent_normalisation(case):
    model, loss, X, y = case.make()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SampleMixingWarning)
        res = gradient_moments(model, loss, X, y)
    assert not res.sample_mixing and res.mixing_modules == ()
    assert "per-sample gradient" in res.explanation


def test_mixing_module_found_numerically_is_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), BatchCentering(), nn.Tanh(), nn.Linear(5, 3))
    model = model.to(DTYPE)
    X, y = torch.randn(6, 4, dtype=DTYPE), torch.arange(6) % 3
    loss = nn.CrossEntropyLoss()
    with pytest.warns(SampleMixingWarning, match=re.escape("module(s) 1 mix")):
        res = gradient_moments(model, loss, X, y, per_component=True)
    report_close(
        res.per_component, dense_per_component_gradients(model, loss, X, y), name="rows"
    )


def test_errors_are_early_and_clear():
    model, loss, X, y = MIXING_CASES[0].make()
    before = state_of(model)
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        gradient_moments(model, loss, X, y, chunk=0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        gradient_moments(None, loss, X, y)
    with pytest.raises(ValueError, match="path='per_sample' is invalid"):
        gradient_moments(model, loss, X, y, path="per_sample")
    with pytest.raises(ValueError, match="batch size"):
        gradient_moments(model, loss, X, y[:3])
    assert_state_equal(before, model)
