"""The engine returns its results; nothing is written back onto the linearisation.

Issue 24 step 4: the Gram and the diagonal come back with their report, the
:class:`~lowrank_ggn.GGN` object keeps the last one, and failure is an exception.
"""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from cases import CASES, MixLast
from utils import assert_spectrum_matches

from lowrank_ggn import GGN
from lowrank_ggn.core.engine import EngineReport, SelfCheckFailed, Solver, Strategy
from lowrank_ggn.core.engine.run import layerwise_gram
from lowrank_ggn.core.gram import gram_from_linearization
from lowrank_ggn.core.linearization import Linearization, linearize
from lowrank_ggn.core.options import GGNOptions
from lowrank_ggn.reference import dense_ggn


def _case(name):
    return next(c for c in CASES if c.name == name).make()


def test_linearization_holds_no_results():
    names = {f.name for f in fields(Linearization)}
    assert "engine_report" not in names and "located" not in names


def test_gram_returns_its_report_and_takes_the_capture_once():
    model, loss, X, y = _case("bn2d-train-ce")
    lin = linearize(model, loss, X, y)
    assert lin.capture is not None
    grams, first = gram_from_linearization(lin)
    assert isinstance(first, EngineReport) and lin.capture is None
    assert first.passes.get("forward", 0) == 0  # the linearisation's pass served
    again, second = gram_from_linearization(lin)
    assert second is not first and second.passes["forward"] == 1
    torch.testing.assert_close(grams[0], again[0])


def test_ggn_keeps_the_last_report():
    model, loss, X, y = _case("mlp-ce-mean")
    ggn = GGN(model, loss, X, y)
    assert ggn.engine_report is None
    ggn.gram()
    report = ggn.engine_report
    spectrum = ggn.spectrum()
    assert spectrum.engine_report is report and report.solver is Solver.DENSE
    lanczos = ggn.spectrum(top_k=2, solver="lanczos")
    assert ggn.engine_report is lanczos.engine_report is not report
    assert lanczos.engine_report.solver is Solver.LANCZOS


def test_located_mixing_is_kept_by_the_linearization():
    model, loss, X, y = _case("bn2d-train-ce")
    lin = linearize(model, loss, X, y)
    calls = []

    def locate(fmodel, inputs):
        calls.append(1)
        return ("found",)

    first = lin.located_mixing(locate)
    assert lin.located_mixing(locate) is first and len(calls) <= 1


def _mixing_beyond_batchnorm():
    """A module that mixes samples besides BatchNorm: bn_split's self-check fails."""
    torch.manual_seed(1)
    nn = torch.nn
    layers = [
        nn.Linear(3, 4),
        nn.BatchNorm1d(4),
        MixLast(),
        nn.Tanh(),
        nn.Linear(4, 2),
    ]
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2).double()
    return nn.Sequential(*layers).double(), nn.MSELoss(), X, y


def test_failed_self_check_is_an_exception_and_falls_back_to_generic():
    model, loss, X, y = _mixing_beyond_batchnorm()
    with pytest.raises(SelfCheckFailed) as info:
        layerwise_gram(linearize(model, loss, X, y), strategy=Strategy.BN_SPLIT)
    assert info.value.report.strategy is Strategy.BN_SPLIT and info.value.params
    lin = linearize(model, loss, X, y)
    options = GGNOptions.of(strategy="bn_split")
    grams, report = gram_from_linearization(lin, options)
    assert report.strategy is Strategy.GENERIC
    assert report.fallback == "bn_split failed its self-check"
    evals = torch.linalg.eigvalsh(grams[0]).flip(0)
    assert_spectrum_matches(
        evals[evals > 1e-10 * evals[0]], dense_ggn(model, loss, X, y)
    )
    diagonal = GGN(model, loss, X, y, strategy="bn_split").diagonal()
    assert diagonal.route.value == "streamed"
    assert "failed its self-check" in diagonal.engine_report.fallback
