"""Every strategy on every BatchNorm flavour, against the float64 dense reference.

Strategies (``lowrank_ggn.core.engine.report.Strategy``) are forced through ``strategy=``;
the Lanczos solver runs on the same cases. Model state is checked bitwise.
"""

from __future__ import annotations

import pytest
import torch
from cases import BN_CASE_IDS, BN_CASES, CASES, MixLast
from utils import (
    RTOL,
    assert_spectrum_matches,
    assert_state_equal,
    report_close,
    state_of,
)

from lowrank_ggn import GGN, ggn_spectrum, gram_matrix
from lowrank_ggn.core.budget import MemoryBudgetExceeded
from lowrank_ggn.core.engine import (
    LayerTreatment,
    Solver,
    Strategy,
    StrategyUnavailable,
    streamed,
)
from lowrank_ggn.core.engine.plan import plan_strategy
from lowrank_ggn.core.engine.run import layerwise_gram
from lowrank_ggn.core.linearization import linearize
from lowrank_ggn.reference import dense_ggn

STRATEGIES = [None, "bn_split", "columns", "streamed"]
#: Lanczos stops at a relative residual of 1e-6 (float64); eigenvalue errors are
#: about residual² / gap, far below this.
LANCZOS_RTOL = 1e-8


@pytest.fixture(params=BN_CASES, ids=BN_CASE_IDS)
def bn_case(request):
    return request.param


@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
def test_every_strategy_is_exact_on_every_batchnorm_flavour(bn_case, strategy):
    model, loss, X, y = bn_case.make()
    before = state_of(model)
    res = ggn_spectrum(model, loss, X, y, eigenvectors=True, strategy=strategy)
    assert_state_equal(before, model)
    G = dense_ggn(model, loss, X, y)
    assert_spectrum_matches(res.eigenvalues, G)
    E = res.eigenvectors
    lam_max = res.eigenvalues[0].item()
    report_close(
        G @ E.T,
        E.T * res.eigenvalues,
        rtol=RTOL * lam_max / G.abs().max().item(),
        name="G e - λ e",
    )
    report = res.engine_report
    assert report.solver is Solver.DENSE
    if strategy is None:
        assert report.strategy is Strategy.BN_SPLIT, (
            report
        )  # the cost model's pick here
    else:
        assert report.strategy is Strategy(strategy), report


def test_lanczos_top_k_is_exact_on_every_batchnorm_flavour(bn_case):
    model, loss, X, y = bn_case.make()
    before = state_of(model)
    res = ggn_spectrum(model, loss, X, y, top_k=3, solver="lanczos", eigenvectors=True)
    assert_state_equal(before, model)
    G = dense_ggn(model, loss, X, y)
    dense = torch.linalg.eigvalsh(G).flip(0)[:3]
    report_close(res.eigenvalues, dense, rtol=LANCZOS_RTOL, name="Lanczos eigenvalues")
    E = res.eigenvectors
    residual = (G @ E.T - E.T * res.eigenvalues).norm(dim=0).max().item()
    assert residual <= 1e-5 * dense[0].item()
    assert res.engine_report.solver is Solver.LANCZOS
    assert res.engine_report.strategy is Strategy.STREAMED


def test_gram_matrix_equal_across_strategies(case):
    """The Gram itself (not only its spectrum) is the same for every strategy."""
    model, loss, X, y = case.make()
    expected = gram_matrix(model, loss, X, y, engine="generic")
    for strategy in ("columns", "streamed", "bn_split"):
        try:
            gram = gram_matrix(model, loss, X, y, strategy=strategy)
        except StrategyUnavailable:
            # a parameter outside every captured layer and BatchNorm (an LSTM,
            # a 0-dim scale): bn_split does not apply
            assert strategy == "bn_split"
            ggn = GGN(model, loss, X, y)
            ggn.gram()
            assert LayerTreatment.GENERIC in ggn.engine_report.layers.values()
            continue
        report_close(gram, expected, name=strategy)


def test_split_pass_counts():
    """bn_split: C frozen passes plus one direction per BatchNorm statistic."""
    model, loss, X, y = next(
        c for c in BN_CASES if c.name == "bn-mixed-train-eval-ce"
    ).make()
    report = ggn_spectrum(model, loss, X, y, top_k=1, strategy="bn_split").engine_report
    C = 3
    # the engine reuses the linearisation's forward pass: no forward of its own
    assert report.passes == {"backward": C, "statistics": 2 * 5}


def test_streamed_pass_counts():
    model, loss, X, y = next(c for c in CASES if c.name == "bn2d-train-ce").make()
    report = ggn_spectrum(model, loss, X, y, top_k=1, strategy="streamed").engine_report
    NC = 5 * 3
    assert report.passes == {"backward": NC, "jvp": NC}


#: Cases for the traced tangent program: BatchNorm flavours, in-place ReLUs, pooling,
#: attention.
TRACED_CASES = list(
    {
        c.name: c
        for c in CASES + BN_CASES
        if c.name
        in (
            "bn2d-train-ce",
            "resnet-bn-train-ce",
            "inplace-relu-train-ce",
            "fused-bn-act-train-ce",
            "bn-two-branches-ce",
            "cnn-pool-ce",
            "transformer-mask-ce",
        )
    }.values()
)


@pytest.mark.parametrize("case", TRACED_CASES, ids=lambda c: c.name)
def test_streamed_traced_jvps_vmapped_over_a_block_are_exact(case, monkeypatch):
    """What large batches get: the tangent program traced once by
    ``torch.func.linearize`` and vmapped over each block of directions."""
    monkeypatch.setattr(streamed, "LINEARIZE_MIN_JVPS", 0)  # tiny batches trace too
    batched = []
    monkeypatch.setattr(
        streamed, "vmap", lambda fn: batched.append(fn) or torch.func.vmap(fn)
    )
    model, loss, X, y = case.make()
    expected = gram_matrix(model, loss, X, y, engine="generic")
    gram = gram_matrix(model, loss, X, y, strategy="streamed")
    report_close(gram, expected, name="streamed, traced and vmapped")
    assert batched, "the traced JVPs did not run vmapped"


def test_mixing_beyond_batchnorm_falls_back_from_split_to_columns():
    """A module that mixes samples besides BatchNorm: bn_split's self-check fails."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4),
        torch.nn.BatchNorm1d(4),
        MixLast(),
        torch.nn.Tanh(),
        torch.nn.Linear(4, 2),
    ).double()
    loss = torch.nn.MSELoss()
    X, y = (
        torch.randn(5, 3, dtype=torch.float64),
        torch.randn(5, 2, dtype=torch.float64),
    )
    res = ggn_spectrum(model, loss, X, y)
    assert res.engine_report.strategy is Strategy.COLUMNS
    assert "bn_split failed its self-check" in res.engine_report.fallback
    assert_spectrum_matches(res.eigenvalues, dense_ggn(model, loss, X, y))


class Scale(torch.nn.Module):
    """``x ⊙ exp(s)`` with a bare parameter ``s``: no captured call reads it.

    (``x ⊙ s`` itself is captured: an elementwise affine with a broadcast parameter.)
    """

    def __init__(self, k: int) -> None:
        super().__init__()
        self.s = torch.nn.Parameter(torch.linspace(0.5, 1.5, k))

    def forward(self, x):
        return x * self.s.exp()


def test_columns_over_budget_falls_back_to_streamed():
    """A bare parameter rules out bn_split; columns' blocks exceed the budget."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6),
        torch.nn.BatchNorm1d(6),
        Scale(6),
        torch.nn.Linear(6, 3),
    ).double()
    loss = torch.nn.CrossEntropyLoss()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    # the engine's work budget (what the call's fixed parts leave): the Gram and S
    # fit, columns' explicit blocks do not
    lin = linearize(model, loss, X, y)
    grams, report = layerwise_gram(lin, memory_budget=18 * 18 * 8 + 432 + 800)
    assert report.strategy is Strategy.STREAMED, report
    res = torch.linalg.eigvalsh(grams[0]).flip(0)[: 3 * 6]
    res = type("R", (), {"eigenvalues": res[res > 1e-10 * res[0]]})
    assert_spectrum_matches(res.eigenvalues, dense_ggn(model, loss, X, y))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(strategy="fast"), "strategy must be None"),
        (
            dict(strategy="columns", engine="generic"),
            "strategy applies to engine='layerwise'",
        ),
        (dict(solver="arpack"), "solver must be one of"),
        (dict(solver="lanczos"), "needs top_k"),
        (dict(solver="auto"), "needs top_k"),
        (dict(solver="lanczos", top_k=2, engine="generic"), "works on the whole GGN"),
    ],
)
def test_bad_options_are_refused_before_any_model_call(kwargs, match):
    class Exploding(torch.nn.Linear):
        def forward(self, x):
            raise AssertionError("the model must not be called")

    model = Exploding(3, 2).double()
    X, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match=match):
        ggn_spectrum(model, torch.nn.CrossEntropyLoss(), X, y, **kwargs)


def test_forced_strategies_that_do_not_apply():
    model, loss, X, y = next(c for c in CASES if c.name == "bn2d-train-ce").make()
    before = state_of(model)
    with pytest.raises(StrategyUnavailable, match="strategy='per_sample' is invalid"):
        ggn_spectrum(model, loss, X, y, strategy="per_sample")
    assert_state_equal(before, model)
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), Scale(3)).double()
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match="strategy='bn_split' needs every parameter"):
        ggn_spectrum(model, torch.nn.CrossEntropyLoss(), X, y, strategy="bn_split")


def test_auto_solver_picks_lanczos_only_when_cheaper():
    model, loss, X, y = next(c for c in CASES if c.name == "bn2d-train-ce").make()
    res = ggn_spectrum(model, loss, X, y, top_k=1, solver="auto")
    assert res.engine_report.solver is Solver.DENSE  # NC = 15 columns: dense is cheap


def test_plan_prefers_split_then_columns_then_streamed():
    """The cost model in isolation: counts and budgets decide."""
    from lowrank_ggn.core.engine.batchnorm import BNLayer
    from lowrank_ggn.core.engine.layer import Layer

    lin_layer = torch.nn.Linear(4, 4)
    la = Layer(
        "0", lin_layer, lin_layer.weight, lin_layer.bias, outputs=[torch.zeros(100, 4)]
    )
    bn_mod = torch.nn.BatchNorm1d(4)
    bn = BNLayer("1", bn_mod, None, None, output=torch.zeros(100, 4))
    order = {id(lin_layer): 0, id(bn_mod): 1}
    common = dict(per_sample=False, C=10, layers=[la], bns=[bn], order=order, item=8)
    plan = plan_strategy(NC=1000, generic_numel=0, budget=2**30, **common)
    assert plan.strategy is Strategy.BN_SPLIT
    assert plan.estimates[Strategy.BN_SPLIT] < plan.estimates[Strategy.COLUMNS]
    plan = plan_strategy(NC=1000, generic_numel=7, budget=2**30, **common)
    assert plan.strategy is Strategy.COLUMNS  # a parameter outside Linear/Conv/BN
    plan = plan_strategy(NC=1000, generic_numel=7, budget=10**4, **common)
    assert plan.strategy is Strategy.STREAMED  # columns' explicit rows do not fit


def test_forced_strategy_that_cannot_fit_is_refused_before_backward_passes():
    """bn_split holds 2K × D_up statistics rows; a budget below that is refused."""
    model, loss, X, y = next(c for c in CASES if c.name == "bn2d-train-ce").make()
    before = state_of(model)
    # the engine's work budget: Gram and S fit, bn_split's factors do not
    budget = 15 * 15 * 8 + 3 * 5 * 3 * 8 + 64
    with pytest.raises(MemoryBudgetExceeded, match="strategy='bn_split' needs about"):
        layerwise_gram(
            linearize(model, loss, X, y),
            memory_budget=budget,
            strategy=Strategy.BN_SPLIT,
        )
    assert_state_equal(before, model)
    # from the public call: refused up front, before the batch's forward pass
    with pytest.raises(MemoryBudgetExceeded, match="more than memory_budget"):
        ggn_spectrum(model, loss, X, y, strategy="bn_split", memory_budget=budget)
    assert_state_equal(before, model)


@pytest.mark.parametrize("solver", ["dense", "lanczos"])
def test_progress_bar_on_stderr_only_when_asked(capsys, solver):
    model, loss, X, y = next(c for c in CASES if c.name == "bn2d-train-ce").make()
    kwargs = dict(top_k=2, solver=solver)
    ggn_spectrum(model, loss, X, y, progress=True, **kwargs)
    out = capsys.readouterr()
    assert "GGN" in out.err and out.out == ""
    ggn_spectrum(model, loss, X, y, progress=False, **kwargs)
    assert capsys.readouterr().err == ""
    ggn_spectrum(model, loss, X, y, **kwargs)  # None: a tiny call shows nothing
    assert capsys.readouterr().err == ""
