"""Float32 spectra against float64 truth on the same weights (lowrank_ggn.core.precision).

Every eigenvalue a float32 model returns must lie within its stated error bound
(``eigenvalue_errors``) of an eigenvalue of the float64 GGN, and within ``1e-3``
relative; every eigenvector residual within its estimate. Truth: ``dense_ggn`` of
the float64 model on the shared case list; the float64 engine (itself tested against
``dense_ggn``) on the trained zoo.
"""

from __future__ import annotations

import copy
import functools
import gc
import warnings

import pytest
import torch
from cases import BN_CASES, CASES
from torch import nn
from utils import cast

from lowrank_ggn import GGN, _batch, curvature, ggn_spectrum, gram_matrix
from lowrank_ggn.app.data import digits_batch
from lowrank_ggn.app.models import build_model
from lowrank_ggn.app.training import train
from lowrank_ggn.core.precision import (
    RESOLVED_RTOL,
    ErrorModel,
    accumulation_dtype,
    resolved,
)
from lowrank_ggn.reference import dense_ggn

F32, F64 = torch.float32, torch.float64
PRECISION_CASES = {c.name: c for c in CASES + BN_CASES}


def _to32(model: nn.Module, X: torch.Tensor, y: torch.Tensor):
    m32 = copy.deepcopy(model).float()
    X32 = cast(X, F32)
    y32 = cast(y, F32)
    return m32, X32, y32


def _truth(model, loss, X, y) -> torch.Tensor:
    """Float64 eigenvalues of the GGN of the float32 weights, descending."""
    m64 = copy.deepcopy(model).double()
    y64 = cast(y, F64)
    G = dense_ggn(m64, loss, cast(X, F64), y64)
    return torch.linalg.eigvalsh(G).flip(0)


def _distance_to(truth: torch.Tensor, evals: torch.Tensor) -> torch.Tensor:
    """``min_j |λ̂_k − λ_j|`` for each returned eigenvalue (Weyl: one lies within ε)."""
    return (evals.double()[:, None] - truth[None, :]).abs().min(1).values


def _check_within_bounds(res, truth: torch.Tensor) -> None:
    dist = _distance_to(truth, res.eigenvalues)
    errors = res.eigenvalue_errors.double()
    assert bool((dist <= errors).all()), (
        "eigenvalues outside their stated error bound: "
        f"worst ratio {(dist / errors).max().item():.3g}"
    )
    rel = dist / res.eigenvalues.double()
    assert rel.max().item() <= RESOLVED_RTOL


@pytest.mark.parametrize("accumulate", ["float64", "native"])
@pytest.mark.parametrize("name", list(PRECISION_CASES))
def test_float32_eigenvalues_within_their_bounds(name, accumulate):
    model, loss, X, y = PRECISION_CASES[name].make()
    m32, X32, y32 = _to32(model, X, y)
    res = ggn_spectrum(m32, loss, X32, y32, accumulate=accumulate)
    assert res.eigenvalues.dtype == F32 and res.eigenvalue_errors.dtype == F32
    assert res.accumulate == accumulate
    truth = _truth(m32, loss, X32, y32)
    _check_within_bounds(res, truth)
    # every nonzero eigenvalue is either returned or counted as unresolved
    assert res.rank + res.num_unresolved == res.num_columns


@pytest.mark.parametrize(
    "name", ["mlp-ce-mean", "cnn-pool-ce", "bn2d-train-ce", "resnet-bn-train-ce"]
)
def test_float32_eigenvector_residuals_within_estimates(name):
    model, loss, X, y = PRECISION_CASES[name].make()
    m32, X32, y32 = _to32(model, X, y)
    res = ggn_spectrum(m32, loss, X32, y32, eigenvectors=True)
    m64 = copy.deepcopy(m32).double()
    G = dense_ggn(
        m64, loss, X32.double(), y32.double() if y32.is_floating_point() else y32
    )
    E = res.eigenvectors.double()  # [K, D]
    lam = res.eigenvalues.double()
    residuals = (G @ E.T - E.T * lam).norm(dim=0)
    assert res.eigenvector_residuals.shape == lam.shape
    assert bool((residuals <= res.eigenvector_residuals.double()).all()), (
        residuals / res.eigenvector_residuals.double()
    ).max()


def test_float64_results_carry_errors_too():
    model, loss, X, y = PRECISION_CASES["bn2d-train-ce"].make()
    res = ggn_spectrum(model, loss, X, y)
    assert res.accumulate == "native" and res.eigenvalue_errors.dtype == F64
    assert bool((res.eigenvalue_errors <= RESOLVED_RTOL * res.eigenvalues).all())
    _check_within_bounds(res, _truth(model, loss, X, y))


def test_lanczos_float32_errors_bound_the_truth():
    model, loss, X, y = PRECISION_CASES["bn2d-train-ce"].make()
    m32, X32, y32 = _to32(model, X, y)
    res = ggn_spectrum(m32, loss, X32, y32, top_k=3, solver="lanczos")
    assert res.rank == 3
    _check_within_bounds(res, _truth(m32, loss, X32, y32))


def test_user_rtol_overrides_the_error_model_and_still_reports_errors():
    model, loss, X, y = PRECISION_CASES["mlp-ce-mean"].make()
    m32, X32, y32 = _to32(model, X, y)
    res = ggn_spectrum(m32, loss, X32, y32, rtol=0.0, accumulate="native")
    assert res.rank + res.num_unresolved == res.num_columns
    assert res.threshold == 0.0 and res.eigenvalue_errors.shape == (res.rank,)


def test_gram_is_summed_in_float64_for_float32_models():
    model, loss, X, y = PRECISION_CASES["cnn-pool-ce"].make()
    m32, X32, y32 = _to32(model, X, y)
    K64 = gram_matrix(m32, loss, X32, y32)
    K32 = gram_matrix(m32, loss, X32, y32, accumulate="native")
    assert K64.dtype == F64 and K32.dtype == F32
    torch.testing.assert_close(K64.float(), K32, rtol=1e-4, atol=1e-6)
    generic = gram_matrix(m32, loss, X32, y32, engine="generic")
    assert generic.dtype == F64
    torch.testing.assert_close(generic, K64, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["cnn-pool-ce", "bn2d-train-ce", "mlp-ce-mean"])
def test_float32_top_k_from_float32_sums_where_they_resolve_it(name):
    """Default options, ``top_k``: float32 sums when the error model resolves every
    returned eigenvalue there; the same eigenvalues as float64 sums, within bounds."""
    model, loss, X, y = PRECISION_CASES[name].make()
    m32, X32, y32 = _to32(model, X, y)
    k = 3
    res = ggn_spectrum(m32, loss, X32, y32, top_k=k, eigenvectors=True)
    assert res.accumulate == "native" and res.rank == k
    assert res.engine_report.solver.value == "dense"
    truth = _truth(m32, loss, X32, y32)
    _check_within_bounds(res, truth)
    full = ggn_spectrum(m32, loss, X32, y32, accumulate="float64")
    torch.testing.assert_close(res.eigenvalues, full.eigenvalues[:k], rtol=1e-5, atol=0)
    E = res.eigenvectors.double()
    G = dense_ggn(copy.deepcopy(m32).double(), loss, cast(X32, F64), cast(y32, F64))
    residual = (G @ E.T - E.T * res.eigenvalues.double()).norm(dim=0)
    assert bool((residual <= res.eigenvector_residuals.double()).all())


def test_float32_top_k_sums_in_float64_where_float32_leaves_one_unresolved():
    """A ``top_k`` reaching eigenvalues that float32 sums cannot resolve: the Gram is
    summed again in float64, and the answer is the float64 one."""
    model, loss, X, y = PRECISION_CASES["depthwise-ce"].make()
    m32, X32, y32 = _to32(model, X, y)
    native = ggn_spectrum(m32, loss, X32, y32, accumulate="native")
    full = ggn_spectrum(m32, loss, X32, y32, accumulate="float64")
    assert full.rank > native.rank  # float64 resolves more: the case is meaningful
    k = native.rank + 1
    assert 2 * k <= native.num_columns  # within the try's range
    seen = []
    real = curvature.gram_from_linearization

    def on(t, ptr: int) -> bool:
        try:  # sparse, batched or fake tensors of other tests have no storage
            return t.untyped_storage().data_ptr() == ptr
        except (RuntimeError, NotImplementedError):
            return False

    def held(ptr: int) -> bool:  # a live tensor on that memory (the Gram, a view)
        gc.collect()
        with warnings.catch_warnings():  # isinstance on deprecated module objects
            warnings.simplefilter("ignore")
            tensors = [t for t in gc.get_objects() if isinstance(t, torch.Tensor)]
        return any(on(t, ptr) for t in tensors)

    def spy(lin, options, *args):
        if seen:  # the float64 sums: the float32 Gram's memory is free by now
            assert not held(seen[0]), "the float32 Gram is still held"
        grams, report = real(lin, options, *args)
        seen.append(grams[0].untyped_storage().data_ptr())
        return grams, report

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(curvature, "gram_from_linearization", spy)  # the float32 try
        mp.setattr(_batch, "gram_from_linearization", spy)  # float64 sums
        res = ggn_spectrum(m32, loss, X32, y32, top_k=k)
    assert len(seen) == 2
    assert res.accumulate == "float64" and res.rank == k
    torch.testing.assert_close(res.eigenvalues, full.eigenvalues[:k])
    once = full.engine_report.passes["backward"]
    assert res.engine_report.passes["backward"] == 2 * once  # both tries counted


def test_float32_top_k_keeps_float64_sums_when_asked_or_cached():
    """``accumulate="float64"``, a user ``rtol`` or a cached float64 Gram: float64."""
    model, loss, X, y = PRECISION_CASES["cnn-pool-ce"].make()
    m32, X32, y32 = _to32(model, X, y)
    assert (
        ggn_spectrum(m32, loss, X32, y32, top_k=2, accumulate="float64").accumulate
        == "float64"
    )
    assert ggn_spectrum(m32, loss, X32, y32, top_k=2, rtol=1e-6).accumulate == "float64"
    ggn = GGN(m32, loss, X32, y32)
    ggn.spectrum()  # float64 sums, cached
    assert ggn.spectrum(top_k=2).accumulate == "float64"
    ggn = GGN(m32, loss, X32, y32)
    ggn.gram()  # a cached float64 Gram alone
    assert ggn.spectrum(top_k=2).accumulate == "float64"
    previous = torch.get_float32_matmul_precision()
    try:  # TF32 / bfloat16 passes: float32 sums are not ε_32-accurate
        torch.set_float32_matmul_precision("high")
        res = ggn_spectrum(m32, loss, X32, y32, top_k=2)
        assert res.accumulate == "float64"
    finally:
        torch.set_float32_matmul_precision(previous)
    fresh = GGN(m32, loss, X32, y32)
    first = fresh.spectrum(top_k=2)
    assert first.accumulate == "native" and fresh.gram().dtype == F64
    assert fresh.spectrum().accumulate == "float64"


def test_accumulate_is_checked_before_the_model_runs():
    model, loss, X, y = PRECISION_CASES["mlp-ce-mean"].make()

    def boom(*args):
        raise AssertionError("the model ran")

    model.register_forward_pre_hook(boom)
    for fn in (ggn_spectrum, gram_matrix):
        with pytest.raises(ValueError, match="accumulate must be"):
            fn(model, loss, X, y, accumulate="float16")


def test_accumulation_dtype_defaults():
    assert accumulation_dtype(F32, None) == F64
    assert accumulation_dtype(torch.bfloat16, None) == F64
    assert accumulation_dtype(F64, None) == F64
    assert accumulation_dtype(F64, "native") == F64
    assert accumulation_dtype(F32, "native") == F32


def test_error_model_terms():
    """Pure function: the three stages add, and the rule keeps ε ≤ 1e-3 λ."""
    model = ErrorModel(factor_eps=1e-7, sum_eps=1e-16, length=100)
    evals = torch.tensor([1.0, 1e-6], dtype=F64)
    evecs = torch.eye(2, dtype=F64)
    diag = torch.tensor([1.0, 1e-6], dtype=F64)
    err = model.eigenvalue_errors(evals, evecs, diag)
    # t = √λ for a diagonal Gram: c_f·1e-7·λ + c_s·1e-16·10·λ + c_e·1e-16·1
    from lowrank_ggn.core.precision import C_EIGH, C_FACTOR, C_SUM

    expected = (
        C_FACTOR * 1e-7 * evals + C_SUM * 1e-16 * 10 * evals + C_EIGH * 1e-16 * 1.0
    )
    torch.testing.assert_close(err, expected)
    assert resolved(evals, err, None, 1.0).tolist() == [True, True]
    assert resolved(evals, err, 1e-3, 1.0).tolist() == [True, False]


# --- trained zoo (the digits CNN) ---------------------------------------


@functools.lru_cache(maxsize=None)
def _trained(name: str) -> nn.Module:
    model = build_model(name, 0, F32)
    train(model, "ce", 150, 0, F32, "cpu", f"training {name}")
    return model


@pytest.mark.parametrize("name", ["cnn", "mlp", "cnn-bn", "resnet-bn"])
def test_trained_zoo_float32_reaches_the_bulk(name):
    """Float32 returns ≥ 90% of what float64 finds above 1e-10·λ_max, all in bounds."""
    m32 = _trained(name)
    X, y = digits_batch(128, 0, F32)
    loss = nn.CrossEntropyLoss()
    truth = ggn_spectrum(copy.deepcopy(m32).double(), loss, cast(X, F64), y, rtol=0.0)
    truth = truth.eigenvalues
    res = ggn_spectrum(m32, loss, X, y)
    _check_within_bounds(res, truth)
    lam_max = truth[0].item()
    found = int((truth > 1e-10 * lam_max).sum())
    got = int((res.eigenvalues.double() > 1e-10 * lam_max).sum())
    assert got >= 0.9 * found, (got, found)
    native = ggn_spectrum(m32, loss, X, y, accumulate="native")
    _check_within_bounds(native, truth)
    assert native.num_unresolved > res.num_unresolved
