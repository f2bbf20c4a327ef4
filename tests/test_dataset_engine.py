"""The layer-wise engine's rows ``Vᵀ`` (``core/engine/rows.py``) and the data-set GGN on it.

The rows of every strategy equal ``lin.factors_matrix()`` (one vmapped backward pass
per column block, no engine) to round-off on every shared case, BatchNorm in train
mode included; the fallbacks (budget, self-check) give the same rows and say so.
"""

from __future__ import annotations

import pytest
import torch
from cases import BN_CASES, CASES, MixLast
from utils import report_close

from lowrank_ggn.core.budget import MemoryBudgetWarning
from lowrank_ggn.core.engine import Strategy, StrategyUnavailable
from lowrank_ggn.core.engine.report import LayerTreatment
from lowrank_ggn.core.engine.rows import layerwise_rows
from lowrank_ggn.core.linearization import linearize
from lowrank_ggn.core.options import GGNOptions
from lowrank_ggn.core.state import model_preserved

#: Rows of two summation orders of the same float64 products.
ROWS_RTOL = 1e-12


def _rows(case_or_problem, sample_index=None, **options):
    """``(layerwise rows, factors_matrix, report)`` of one problem."""
    made = case_or_problem
    model, loss, X, y = made.make() if hasattr(made, "make") else made
    opts = GGNOptions.of(**options)
    with model_preserved(model):
        lin = linearize(model, loss, X, y, options=opts, sample_index=sample_index)
        rows, report = layerwise_rows(lin, opts)
        return rows, lin.factors_matrix(), report


def test_rows_equal_factors_matrix_on_every_case(case):
    rows, reference, report = _rows(case)
    report_close(rows, reference, rtol=ROWS_RTOL, name=f"Vᵀ ({report.strategy})")
    expected = Strategy.BN_SPLIT if case.mixing else Strategy.PER_SAMPLE
    assert report.strategy is expected or report.fallback, report


#: One case per kind of layer a strategy lays out: BatchNorm (train, two branches),
#: convolutions and pooling, tied weights, an uncaptured 0-dim parameter.
STRATEGY_CASES = [
    c
    for c in CASES + BN_CASES
    if c.name
    in ("bn2d-train-ce", "bn-two-branches-ce", "tied-conv1d-lm", "zero-dim-param-ce")
]


@pytest.mark.parametrize("case", STRATEGY_CASES, ids=str)
@pytest.mark.parametrize(
    "strategy", ["per_sample", "bn_split", "columns", "streamed", "generic"]
)
def test_every_strategy_gives_the_same_rows(case, strategy):
    try:
        rows, reference, report = _rows(case, strategy=strategy)
    except StrategyUnavailable:
        assert strategy in ("per_sample", "bn_split")  # a mixing or generic model
        return
    report_close(rows, reference, rtol=ROWS_RTOL, name=f"Vᵀ ({strategy})")
    assert report.strategy is Strategy(strategy)
    if strategy in ("streamed", "generic"):  # no per-layer factors
        assert "rows from lin.factors_matrix" in report.fallback
    elif strategy == "bn_split" and case.mixing:
        assert LayerTreatment.SPLIT in report.layers.values(), report


def test_subsampled_and_monte_carlo_rows():
    case = next(c for c in CASES if c.name == "bn2d-train-ce")
    index = torch.tensor([3, 0, 4])
    gen = torch.Generator().manual_seed(3)
    rows, reference, report = _rows(case, index, mc_samples=2, generator=gen)
    assert rows.shape[0] == 3 * 2 and report.strategy is Strategy.BN_SPLIT
    report_close(rows, reference, rtol=ROWS_RTOL, name="Vᵀ of S = [3, 0, 4]")


def _mixing_beyond_batchnorm():
    """BatchNorm, then a module that mixes samples: bn_split's self-check fails."""
    torch.manual_seed(1)
    nn = torch.nn
    layers = [nn.Linear(3, 4), nn.BatchNorm1d(4), MixLast(), nn.Tanh(), nn.Linear(4, 2)]
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2).double()
    return nn.Sequential(*layers).double(), nn.MSELoss(), X, y


def test_fallbacks_give_the_same_rows_and_say_so():
    problem = _mixing_beyond_batchnorm()
    rows, reference, report = _rows(problem)  # bn_split fails: columns
    report_close(rows, reference, rtol=ROWS_RTOL, name="Vᵀ (columns)")
    assert report.strategy is Strategy.COLUMNS
    assert report.fallback == "bn_split failed its self-check; columns instead"
    rows, reference, report = _rows(problem, strategy="bn_split")  # forced: generic
    report_close(rows, reference, rtol=ROWS_RTOL, name="Vᵀ (generic)")
    assert report.strategy is Strategy.GENERIC
    assert "bn_split failed its self-check" in report.fallback
    case = next(c for c in CASES if c.name == "bn2d-train-ce")
    with pytest.warns(MemoryBudgetWarning, match="forces strategy='streamed'"):
        rows, reference, report = _rows(case, memory_budget=2_000)
    report_close(rows, reference, rtol=ROWS_RTOL, name="Vᵀ (over the budget)")
    assert report.strategy is Strategy.STREAMED, report
    assert "rows from lin.factors_matrix" in report.fallback
