"""Early, clear errors for the options: chunk, rtol, path, the memory budget (checked
before the forward pass, from the environment, exactly enough) and near-zero
eigenvalues (thresholds, warnings, dropped eigenvectors).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from bad_inputs import _make
from public_calls import (
    assert_state_bitwise,
)
from test_validation import forward_counter, refused_before_forward
from torch import nn
from utils import RTOL, report_close, state_of

from lowrank_ggn import (
    GGN,
    NearZeroEigenvalueWarning,
    ggn_spectrum,
    gram_matrix,
)
from lowrank_ggn.core.budget import (
    DEFAULT_MEMORY_BUDGET,
    MEMORY_BUDGET_ENV,
    MemoryBudgetExceeded,
    check_memory,
    resolve_memory_budget,
)
from lowrank_ggn.core.linearization import linearize
from lowrank_ggn.core.options import GGNOptions
from lowrank_ggn.core.spectrum import parameter_eigenvectors
from lowrank_ggn.reference import dense_ggn

F64 = torch.float64
# --- options ----------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [0, -3, 1.5, True, "8", None])
@pytest.mark.parametrize("fn", [gram_matrix, ggn_spectrum], ids=lambda f: f.__name__)
def test_bad_chunk_raises(fn, chunk):
    model, loss, X, y, _ = _make()
    with refused_before_forward(model, ValueError, "chunk must be a positive int"):
        fn(model, loss, X, y, chunk=chunk)


@pytest.mark.parametrize(
    "rtol,error,match",
    [
        (-1e-3, ValueError, "rtol must be finite and >= 0"),
        (math.nan, ValueError, "rtol must be finite and >= 0"),
        (math.inf, ValueError, "rtol must be finite and >= 0"),
        ("1e-8", TypeError, "rtol must be a float or None"),
    ],
)
def test_bad_rtol_raises(rtol, error, match):
    model, loss, X, y, _ = _make()
    before = state_of(model)
    with refused_before_forward(model, error, match):
        ggn_spectrum(model, loss, X, y, rtol=rtol)
    assert_state_bitwise(before, model)


def test_bad_path_raises():
    model, loss, X, y, _ = _make("mlp-ce-mean")
    with pytest.raises(ValueError, match="path must be None"):
        gram_matrix(model, loss, X, y, path="fast")


# --- memory budget ---------------------------------------------------------------


def _estimate(model, loss, X, y, fn, engine):
    """The call's own estimate of its peak (bytes), from a run with room to spare."""
    ggn = GGN(model, loss, X, y, engine=engine, memory_budget=2**30)
    ggn.gram() if fn is gram_matrix else ggn.spectrum()
    return sum(ggn.engine_report.memory_estimate.values())


@pytest.mark.parametrize("engine", ["generic", "layerwise"])
@pytest.mark.parametrize("fn", [gram_matrix, ggn_spectrum], ids=lambda f: f.__name__)
def test_memory_budget_is_checked_before_the_forward_pass(fn, engine):
    """The whole call's estimate (lowrank_ggn.core.footprint): over it is refused."""
    model, loss, X, y, _ = _make()
    need = _estimate(model, loss, X, y, fn, engine)
    before = state_of(model)
    with (
        forward_counter(model) as forwards,
        pytest.raises(MemoryBudgetExceeded, match="more than memory_budget") as info,
    ):
        fn(model, loss, X, y, memory_budget=need - 1, engine=engine)
    msg = str(info.value)
    vt = "factors Vᵀ [18, "
    assert (vt in msg) == (engine == "generic"), msg
    for part in (
        "Gram matrices 1 × [18, 18]",
        "recorded forward pass",
        "a batch of at most",
        "params=[...]",
        "mc_samples",
        MEMORY_BUDGET_ENV,
    ):
        assert part in msg, f"{part!r} missing from: {msg}"
    assert forwards[0] <= 1  # the 4-sample probe only
    assert_state_bitwise(before, model)


def test_memory_budget_exactly_enough_passes():
    """The generic engine needs no streamed minimum: its estimate is its bar."""
    model, loss, X, y, _ = _make()
    need = _estimate(model, loss, X, y, gram_matrix, "generic")
    report_close(
        gram_matrix(model, loss, X, y, memory_budget=need, engine="generic"),
        gram_matrix(model, loss, X, y, memory_budget=math.inf),
    )


def test_memory_budget_for_loss_factors_is_checked_before_they_exist(monkeypatch):
    """Segmentation CE: S [K·P, N, K, *pos] is refused before it is formed."""
    model, loss, X, y, _ = _make("segmentation-ce-mean")

    def refuse(*args, **kwargs):
        raise AssertionError("S was formed before the budget check")

    monkeypatch.setattr("lowrank_ggn.core.linearization.hessian_factors", refuse)
    N, K, P = 3, 3, 9
    with pytest.raises(ValueError, match=r"loss-Hessian factors S \[C=27, N=3, O=27\]"):
        budget = K * P * N * K * P * 8 - 1
        linearize(model, loss, X, y, options=GGNOptions.of(memory_budget=budget))


def test_memory_budget_from_environment(monkeypatch):
    model, loss, X, y, _ = _make()
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "1000")
    with pytest.raises(ValueError, match="more than memory_budget=1000 B"):
        gram_matrix(model, loss, X, y)
    gram_matrix(model, loss, X, y, memory_budget=2**30)  # the keyword wins
    for raw, value in [("16GiB", 16 * 2**30), ("2 MB", 2 * 2**20), ("1e9", 1e9)]:
        monkeypatch.setenv(MEMORY_BUDGET_ENV, raw)
        assert resolve_memory_budget() == value
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "lots")
    with pytest.raises(
        ValueError, match=f"{MEMORY_BUDGET_ENV}='lots' is not a positive"
    ):
        gram_matrix(model, loss, X, y)
    monkeypatch.delenv(MEMORY_BUDGET_ENV)
    assert resolve_memory_budget() == DEFAULT_MEMORY_BUDGET == 4 * 2**30


@pytest.mark.parametrize(
    "budget,error", [(0, ValueError), (-5, ValueError), ("8GiB", TypeError)]
)
def test_bad_memory_budget_raises(budget, error):
    model, loss, X, y, _ = _make()
    with refused_before_forward(model, error, "memory_budget"):
        ggn_spectrum(model, loss, X, y, memory_budget=budget)


def test_check_memory_reports_sizes():
    with pytest.raises(ValueError, match=r"needs about 1.00 GiB \(Gram: 1.00 GiB\)"):
        check_memory({"Gram": 2**27}, 8, memory_budget=2**29)


# --- near-zero eigenvalues ---------------------------------------------------------


def _tiny_eigenvalue_problem():
    """``G = 2 XᵀX = diag(2, 2e-20)``: an exact eigenvalue 1e-20·λ_max, below N·C·eps."""
    model = nn.Linear(2, 1, bias=False).double()
    X = torch.tensor([[1.0, 0.0], [0.0, 1e-10]], dtype=F64)
    y = torch.zeros(2, 1, dtype=F64)
    return model, nn.MSELoss(reduction="sum"), X, y


def test_tiny_rtol_keeps_tiny_eigenvalues_without_eigenvectors():
    model, loss, X, y = _tiny_eigenvalue_problem()
    res = ggn_spectrum(model, loss, X, y, rtol=0.0)
    report_close(res.eigenvalues, torch.tensor([2.0, 2e-20], dtype=F64), name="λ")
    assert ggn_spectrum(model, loss, X, y).rank == 1  # default threshold drops it


@pytest.mark.parametrize("rtol", [0.0, 1e-30])
def test_eigenvectors_at_near_zero_eigenvalues_warn_and_are_dropped(rtol):
    model, loss, X, y = _tiny_eigenvalue_problem()
    before = state_of(model)
    with pytest.warns(
        NearZeroEigenvalueWarning, match="1 of 2 eigenvalues are at or below"
    ):
        res = ggn_spectrum(model, loss, X, y, rtol=rtol, eigenvectors=True)
    assert res.rank == 1 and res.eigenvectors.shape == (1, 2)
    assert res.gram_eigenvectors.shape == (2, 1)
    assert res.threshold >= 2 * torch.finfo(F64).eps * 2.0  # N·C·eps·λ_max
    G = dense_ggn(model, loss, X, y)
    e = res.eigenvectors
    report_close(G @ e.T, e.T * res.eigenvalues, name="G e")
    assert_state_bitwise(before, model)


def test_default_threshold_never_warns():
    model, loss, X, y, _ = _make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ggn_spectrum(model, loss, X, y, eigenvectors=True)


def test_parameter_eigenvectors_refuses_near_zero_eigenvalues():
    model, loss, X, y = _tiny_eigenvalue_problem()
    lin = linearize(model, loss, X, y)
    U = torch.eye(2, dtype=F64)
    with pytest.raises(ValueError, match="would divide by ≈0"):
        parameter_eigenvectors(lin, torch.tensor([2.0, 2e-20], dtype=F64), U)
    E = parameter_eigenvectors(lin, torch.tensor([2.0], dtype=F64), U[:, :1])
    report_close(E, torch.tensor([[1.0, 0.0]], dtype=F64), rtol=RTOL)
