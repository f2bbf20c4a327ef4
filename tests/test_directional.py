"""Directional derivatives γ_nk, λ_nk against brute force, float64."""

from __future__ import annotations

import re
import warnings
from functools import lru_cache

import pytest
import torch
from cases import CASES, DTYPE, MIXING_CASES, NON_MIXING_NORM_CASES
from test_structure import EXPECTED_MIXING
from utils import RTOL, assert_state_equal, batch_of, report_close, rho_of, state_of

from lowrank_ggn import SampleMixingWarning, directional_derivatives, ggn_spectrum
from lowrank_ggn.reference import (
    dense_directional_derivatives,
    dense_ggn,
    dense_gradient,
)

CASE_BY_NAME = {c.name: c for c in CASES}
K = 3


def _directions(D: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(42)
    return torch.randn(K, D, generator=gen, dtype=DTYPE)


@lru_cache(maxsize=None)
def _dense(name: str):
    """Brute force: directions, ρ, γ, λ ``[N, K]``, GGN and gradient."""
    model, loss, X, y = CASE_BY_NAME[name].make()
    G = dense_ggn(model, loss, X, y)
    E = _directions(G.shape[0])
    rho = rho_of(loss, batch_of(X))
    gammas, lambdas = dense_directional_derivatives(model, loss, X, y, E, rho)
    return E, rho, gammas, lambdas, G, dense_gradient(model, loss, X, y)


def _run(name: str, directions, **kwargs):
    """Run on a fresh copy of the case; check the state and the warning count."""
    case = CASE_BY_NAME[name]
    model, loss, X, y = case.make()
    before = state_of(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SampleMixingWarning)
        if callable(directions):
            directions = directions(model, loss, X, y)
        res = directional_derivatives(model, loss, X, y, directions, **kwargs)
    assert_state_equal(before, model)
    mixing = [w for w in caught if w.category is SampleMixingWarning]
    assert len(mixing) == int(case.mixing)
    return res


def test_gammas_and_lambdas_match_brute_force(case):
    E, rho, gammas, lambdas, G, g = _dense(case.name)
    res = _run(case.name, E, chunk=2)
    assert res.rho == rho
    report_close(res.gammas, gammas, name="γ")
    report_close(res.lambdas, lambdas, name="λ")
    assert (res.lambdas >= -RTOL * lambdas.abs().max()).all(), "λ must be ≥ 0"
    # ρ Σ_n λ_nk = e_kᵀ G e_k and ρ Σ_n γ_nk = e_kᵀ ∇L against the dense GGN/gradient
    report_close(res.curvatures, torch.einsum("kd,de,ke->k", E, G, E), name="eᵀGe")
    report_close(res.slopes, E @ g, name="eᵀ∇L")
    assert res.sample_mixing == case.mixing
    assert res.mixing_modules == EXPECTED_MIXING.get(case.name, ())
    for label, values in (("gamma", gammas), ("lambda", lambdas)):
        mean = values.mean(0)
        variance = (values - mean).square().mean(0)
        report_close(getattr(res, f"{label}_mean"), mean, name=f"{label}_mean")
        report_close(getattr(res, f"{label}_variance"), variance, name=f"{label}_var")
        ok = variance > RTOL * variance.max()
        report_close(
            getattr(res, f"{label}_snr")[ok],
            mean[ok].square() / variance[ok],
            name=f"{label}_snr",
        )


def _spectrum(model, loss, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleMixingWarning)
        return ggn_spectrum(model, loss, X, y, top_k=K, eigenvectors=True)


def test_ggn_eigenvectors_are_accepted_and_give_the_eigenvalues(case):
    model, loss, X, y = case.make()
    spec = _spectrum(model, loss, X, y)
    res = _run(case.name, spec)
    lam = spec.eigenvalues
    report_close(res.curvatures, lam, rtol=RTOL, name="eᵀGe vs λ")


@pytest.mark.parametrize("name", ["mlp-ce-mean", "resnet-bn-train-ce"])
def test_spectrum_and_its_eigenvectors_give_the_same_result(name):
    model, loss, X, y = CASE_BY_NAME[name].make()
    spec = _spectrum(model, loss, X, y)
    res = _run(name, spec)
    same = _run(name, spec.eigenvectors)
    report_close(same.gammas, res.gammas, name="γ (tensor vs spectrum)")
    report_close(same.lambdas, res.lambdas, name="λ (tensor vs spectrum)")


def test_a_single_direction_may_be_one_dimensional():
    name = "mlp-ce-mean"
    E = _dense(name)[0]
    one = _run(name, E[1])
    many = _run(name, E)
    assert one.gammas.shape == (6, 1)
    report_close(one.lambdas[:, 0], many.lambdas[:, 1], name="λ")


@pytest.mark.parametrize("case", MIXING_CASES, ids=lambda c: c.name)
def test_warning_names_the_mixing_modules_once(case):
    model, loss, X, y = case.make()
    name = ", ".join(EXPECTED_MIXING[case.name])
    E = _directions(sum(p.numel() for p in model.parameters()))
    with pytest.warns(
        SampleMixingWarning, match=re.escape(f"module(s) {name} mix")
    ) as rec:
        res = directional_derivatives(model, loss, X, y, E)
    assert len([w for w in rec if w.category is SampleMixingWarning]) == 1
    assert res.sample_mixing and "per-component" in res.explanation


@pytest.mark.parametrize("case", NON_MIXING_NORM_CASES, ids=lambda c: c.name)
def test_no_warning_for_sample_independent_normalisation(case):
    model, loss, X, y = case.make()
    E = _directions(sum(p.numel() for p in model.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SampleMixingWarning)
        res = directional_derivatives(model, loss, X, y, E)
    assert not res.sample_mixing


def test_errors_are_early_and_clear():
    model, loss, X, y = MIXING_CASES[0].make()
    D = sum(p.numel() for p in model.parameters())
    E = _directions(D)
    before = state_of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleMixingWarning)
        no_vectors = ggn_spectrum(model, loss, X, y, top_k=1)
    with pytest.raises(ValueError, match=re.escape("eigenvectors=True")):
        directional_derivatives(model, loss, X, y, no_vectors)
    with pytest.raises(ValueError, match=f"D = {D}"):
        directional_derivatives(model, loss, X, y, E[:, :-1])
    with pytest.raises(ValueError, match=r"shape \[K, D\]"):
        directional_derivatives(model, loss, X, y, E.reshape(K, 1, D))
    with pytest.raises(ValueError, match="convert with"):
        directional_derivatives(model, loss, X, y, E.float())
    with pytest.raises(ValueError, match="NaN or Inf"):
        directional_derivatives(model, loss, X, y, E * float("nan"))
    with pytest.raises(TypeError, match="directions must be a tensor"):
        directional_derivatives(model, loss, X, y, E.tolist())
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        directional_derivatives(model, loss, X, y, E, chunk=-1)
    assert_state_equal(before, model)
