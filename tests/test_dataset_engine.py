"""The layer-wise engine's rows ``Vᵀ`` (``core/engine/rows.py``) and the data-set GGN on it.

The rows of every strategy equal ``lin.factors_matrix()`` (one vmapped backward pass
per column block, no engine) to round-off on every shared case, BatchNorm in train
mode included; the fallbacks (budget, self-check) give the same rows and say so.
"""

from __future__ import annotations

import pytest
import torch
from cases import BN_CASES, CASES, MixLast
from test_dataset import _batches as dataset_batches
from test_dataset import _dense_dataset_ggn as dense_dataset_ggn
from test_subsampling import dense_subsampled_ggn
from utils import assert_spectrum_matches, assert_state_equal, report_close, state_of

from lowrank_ggn import GGNOptions, ggn_spectrum_dataset
from lowrank_ggn.core.budget import MemoryBudgetWarning
from lowrank_ggn.core.engine import Strategy, StrategyUnavailable
from lowrank_ggn.core.engine.report import LayerTreatment
from lowrank_ggn.core.engine.rows import layerwise_rows
from lowrank_ggn.core.linearization import linearize
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
    if strategy in ("streamed", "generic"):  # no per-layer factors
        assert report.strategy is Strategy.GENERIC
        assert strategy in report.fallback, report.fallback
        assert "rows from lin.factors_matrix" in report.fallback
        return
    assert report.strategy is Strategy(strategy)
    if strategy == "columns" and case.mixing:
        assert LayerTreatment.MIXING in report.layers.values(), report
    elif strategy == "bn_split" and case.mixing:
        assert any(t.split for t in report.layers.values()), report


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
    rows, reference, report = _rows(problem)  # bn_split fails: columns' passes
    report_close(rows, reference, rtol=ROWS_RTOL, name="Vᵀ (columns)")
    assert report.strategy is Strategy.GENERIC
    assert report.fallback == (
        "bn_split failed its self-check; columns instead; no per-layer factors "
        "(columns): rows from lin.factors_matrix"
    )
    rows, reference, report = _rows(problem, strategy="bn_split")  # forced: generic
    report_close(rows, reference, rtol=ROWS_RTOL, name="Vᵀ (generic)")
    assert report.strategy is Strategy.GENERIC
    assert "bn_split failed its self-check" in report.fallback
    case = next(c for c in CASES if c.name == "bn2d-train-ce")
    with pytest.warns(MemoryBudgetWarning, match="forces strategy='streamed'"):
        rows, reference, report = _rows(case, memory_budget=2_000)
    report_close(rows, reference, rtol=ROWS_RTOL, name="Vᵀ (over the budget)")
    assert report.strategy is Strategy.GENERIC, report
    assert "(streamed): rows from lin.factors_matrix" in report.fallback


# ------------------------------------------------ the data-set spectrum on the rows
def _case(name):
    return next(c for c in CASES if c.name == name)


@pytest.mark.parametrize(
    ("name", "strategy", "took"),
    [
        ("cnn-pool-ce", "per_sample", Strategy.PER_SAMPLE),
        ("bn2d-train-ce", None, Strategy.BN_SPLIT),
        ("bn2d-train-ce", "columns", Strategy.COLUMNS),
        ("bn2d-train-ce", "streamed", Strategy.GENERIC),
        ("bn2d-train-ce", "generic", Strategy.GENERIC),
    ],
    ids=str,
)
def test_dataset_spectrum_of_every_strategy_matches_dense(name, strategy, took):
    model, loss, batches = dataset_batches(_case(name))
    before = state_of(model)
    res = ggn_spectrum_dataset(model, loss, batches, strategy=strategy)
    assert_state_equal(before, model)
    assert_spectrum_matches(res.eigenvalues, dense_dataset_ggn(model, loss, batches))
    assert [r.strategy for r in res.engine_reports] == [took, took]
    by_object = ggn_spectrum_dataset(
        model, loss, batches, options=GGNOptions.of(strategy=strategy)
    )
    assert torch.equal(by_object.eigenvalues, res.eigenvalues)


def test_dataset_accumulate_native_and_float64():
    """A float32 model: the Gram summed in float32 (native) or float64 (default)."""
    model, loss, batches = dataset_batches(_case("bn1d-train-ce"))
    truth = torch.linalg.eigvalsh(dense_dataset_ggn(model, loss, batches)).flip(0)
    model = model.float()
    batches = [(X.float(), y) for X, y in batches]
    before = state_of(model)
    errors = {}
    for accumulate in ("native", "float64"):
        res = ggn_spectrum_dataset(
            model, loss, batches, accumulate=accumulate, rtol=0.0
        )
        assert_state_equal(before, model)
        K = res.rank
        actual = (res.eigenvalues.double() - truth[:K]).abs()
        assert (actual <= res.eigenvalue_errors.double()).all(), (accumulate, actual)
        errors[accumulate] = res.eigenvalue_errors.min().item()
    # eigh's c_e ε_a λ_max: ε_32 ≈ 1e-7 against ε_64 ≈ 2e-16 (measured ratio ≥ 3e7)
    assert errors["native"] > 1e6 * errors["float64"], errors


@pytest.mark.parametrize("solver", ["dense", "lanczos"])
def test_dataset_subsampling_weights_match_dense(solver):
    """``Σ_b w_b κ_b J_Sᵀ H_SS J_S`` with ``w_b = N_b/ΣN``, ``κ_b = N_b/|S|``."""
    model, loss, batches = dataset_batches(_case("bn2d-train-ce"))  # N = 5, 4
    index = [3, 0]
    total = sum(X.shape[0] for X, _ in batches)
    G = sum(
        X.shape[0] / total * dense_subsampled_ggn(model, loss, X, y, index)
        for X, y in batches
    )
    before = state_of(model)
    top_k = None if solver == "dense" else 3
    res = ggn_spectrum_dataset(
        model, loss, batches, subsampling=index, solver=solver, top_k=top_k
    )
    assert_state_equal(before, model)
    assert res.num_columns == 2 * len(index) * 3 and res.weights == [5 / 9, 4 / 9]
    if solver == "dense":
        assert_spectrum_matches(res.eigenvalues, G)
    else:
        dense = torch.linalg.eigvalsh(G).flip(0)[:top_k]
        report_close(res.eigenvalues, dense, rtol=1e-8, name="Lanczos, sub-sampled")


def test_dataset_subsampling_beyond_a_batch_names_it():
    model, loss, batches = dataset_batches(_case("mlp-ce-mean"))  # N = 6, 5
    with pytest.raises(ValueError, match=r"batches\[1\]: subsampling positions.*"):
        ggn_spectrum_dataset(model, loss, batches, subsampling=[5])
    with pytest.raises(TypeError, match="subsampling must hold ints"):
        ggn_spectrum_dataset(model, loss, batches, subsampling=[0.5])
