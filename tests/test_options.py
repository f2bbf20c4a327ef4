"""One options object: strings become typed modes once, with one set of rules."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from cases import BN_CASES, CASES

from lowrank_ggn import GGN, SampleMixingWarning, ggn_spectrum_dataset, gram_matrix
from lowrank_ggn.core.budget import MEMORY_BUDGET_ENV
from lowrank_ggn.core.engine import LayerTreatment
from lowrank_ggn.core.modes import Accumulate, PathName, Solver, Strategy
from lowrank_ggn.core.options import GGNOptions, strategy_of
from lowrank_ggn.optim import DampedNewton

#: Gram matrices of two routes of the same float64 case agree to rounding.
RTOL = 1e-10


def test_strings_become_modes():
    opts = GGNOptions.of(
        strategy="columns", path="full_batch", accumulate="float64", chunk=8
    )
    assert opts.strategy is Strategy.COLUMNS and opts.path is PathName.FULL_BATCH
    assert opts.accumulate is Accumulate.FLOAT64 and opts.chunk == 8
    assert opts.engine == "layerwise" and not opts.generic
    assert GGNOptions.of() == GGNOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.chunk = 2


@pytest.mark.parametrize(
    "engine, strategy, expected",
    [
        ("layerwise", None, None),
        ("layerwise", "streamed", Strategy.STREAMED),
        ("layerwise", "generic", Strategy.GENERIC),
        ("generic", None, Strategy.GENERIC),
        ("generic", "generic", Strategy.GENERIC),
    ],
)
def test_engine_folds_into_strategy(engine, strategy, expected):
    assert strategy_of(engine, strategy) is expected
    assert GGNOptions.of(engine=engine, strategy=strategy).strategy is expected


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(engine="fast"), ValueError, "engine must be one of"),
        (dict(strategy="fast"), ValueError, "strategy must be None"),
        (dict(engine="generic", strategy="columns"), ValueError, "strategy applies"),
        (dict(path="sometimes"), ValueError, "path must be None"),
        (dict(accumulate="float16"), ValueError, "accumulate must be None"),
        (dict(chunk=0), ValueError, "chunk must be a positive int"),
        (dict(mc_samples=0), ValueError, "mc_samples must be a positive int"),
        (dict(generator=torch.Generator()), ValueError, "generator is only used"),
        (dict(memory_budget=-1), ValueError, "memory_budget must be a positive"),
        (dict(output=1.5), TypeError, "output must be None"),
    ],
)
def test_one_set_of_rules(kwargs, error, match):
    with pytest.raises(error, match=match):
        GGNOptions.of(**kwargs)


def test_memory_budget_is_resolved_once(monkeypatch):
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "1MiB")
    assert GGNOptions.of().memory_budget == 2**20
    assert GGNOptions.of(memory_budget=5e6).memory_budget == 5e6


def test_modes_never_equal_across_enums():
    assert PathName.PER_SAMPLE != Strategy.PER_SAMPLE
    assert LayerTreatment.GENERIC != Strategy.GENERIC
    assert Strategy.GENERIC == "generic" and "generic" == Strategy.GENERIC
    assert {"dense": 1}[Solver.DENSE] == 1  # hashed as its string
    assert len({PathName.PER_SAMPLE, Strategy.PER_SAMPLE}) == 2
    assert str(Accumulate.NATIVE) == "native"


def test_strategy_generic_is_engine_generic():
    """``strategy="generic"`` (refused before) is ``engine="generic"``."""
    model, loss, X, y = CASES[0].make()
    by_engine = GGN(model, loss, X, y, engine="generic")
    by_strategy = GGN(model, loss, X, y, strategy="generic")
    G = by_engine.gram()
    assert torch.allclose(by_strategy.gram(), G, rtol=RTOL, atol=RTOL * G.abs().max())
    assert by_engine.engine_report.strategy is Strategy.GENERIC
    assert by_strategy.engine_report.strategy is Strategy.GENERIC
    assert by_strategy.options == by_engine.options


def test_object_keeps_typed_options():
    model, loss, X, y = BN_CASES[0].make()
    ggn = GGN(model, loss, X, y, strategy="bn_split", accumulate="native", chunk=3)
    assert ggn.options.strategy is Strategy.BN_SPLIT
    assert ggn.options.accumulate is Accumulate.NATIVE and ggn.options.chunk == 3
    assert ggn.gram().dtype == X.dtype
    assert ggn.engine_report.strategy is Strategy.BN_SPLIT
    assert torch.equal(ggn.gram(), gram_matrix(model, loss, X, y, **_kw(ggn)))


def _kw(ggn: GGN) -> dict:
    opts = ggn.options
    return dict(strategy=opts.strategy.value, accumulate="native", chunk=opts.chunk)


def test_one_object_for_every_entry():
    """``options=`` in ``GGN``, the one-call functions, ``DampedNewton`` and the data
    set: the same results as the keywords it stands for."""
    opts = GGNOptions.of(strategy="bn_split", accumulate="native", chunk=3)
    model, loss, X, y = BN_CASES[0].make()
    ggn = GGN(model, loss, X, y, options=opts)
    assert ggn.options is opts
    assert torch.equal(ggn.gram(), gram_matrix(model, loss, X, y, options=opts))
    keywords = GGN(model, loss, X, y, strategy="bn_split", accumulate="native", chunk=3)
    assert torch.equal(ggn.gram(), keywords.gram())
    assert ggn.engine_report.strategy is Strategy.BN_SPLIT

    generic = GGNOptions.of(engine="generic")
    steps = []
    for options in (None, generic):
        model, loss, X, y = BN_CASES[0].make()
        opt = DampedNewton(
            model.parameters(), model=model, loss_func=loss, top_k=2, options=options
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SampleMixingWarning)
            info = opt.step(X, y)
        steps.append(
            (info, torch.cat([p.detach().flatten() for p in model.parameters()]))
        )
    assert steps[1][0].engine_report.strategy is Strategy.GENERIC
    assert steps[0][0].engine_report.strategy is not Strategy.GENERIC
    assert torch.allclose(steps[0][1], steps[1][1], rtol=RTOL, atol=RTOL)

    model, loss, X, y = CASES[0].make()
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    by_object = ggn_spectrum_dataset(
        model, loss, batches, options=GGNOptions.of(chunk=2)
    )
    by_keyword = ggn_spectrum_dataset(model, loss, batches, chunk=2)
    assert torch.allclose(by_object.eigenvalues, by_keyword.eigenvalues, rtol=RTOL)


def test_options_and_keywords_not_both():
    model, loss, X, y = CASES[0].make()
    opts = GGNOptions.of(chunk=4)
    with pytest.raises(ValueError, match=r"not both; got options= and chunk=8"):
        GGN(model, loss, X, y, chunk=8, options=opts)
    with pytest.raises(ValueError, match=r"options= and mc_samples=2"):
        DampedNewton(
            model.parameters(),
            model=model,
            loss_func=loss,
            top_k=2,
            mc_samples=2,
            options=opts,
        )
    with pytest.raises(TypeError, match="options must be None or a GGNOptions"):
        GGN(model, loss, X, y, options={"chunk": 4})
    # a keyword at its default beside options= is no clash (DampedNewton's progress)
    opt = DampedNewton(
        model.parameters(),
        model=model,
        loss_func=loss,
        top_k=2,
        progress=False,
        options=opts,
    )
    assert opt.options is opts
