"""The Gram engine (lowrank_ggn.core.engine) against the generic engine and the dense reference."""

from __future__ import annotations

import pytest
import torch
from cases import CASES, MixLast
from utils import assert_spectrum_matches, report_close

from lowrank_ggn import ggn_spectrum, gram_matrix
from lowrank_ggn.core.budget import MemoryBudgetExceeded
from lowrank_ggn.core.engine import LayerTreatment, Strategy
from lowrank_ggn.core.engine.accumulate import (
    add_kron_blocks,
    input_kernel,
    symmetric_rank_k_update,
)
from lowrank_ggn.core.engine.operands import DenseOperand
from lowrank_ggn.core.engine.run import layerwise_gram
from lowrank_ggn.core.linearization import linearize
from lowrank_ggn.reference import dense_ggn

MIXING = LayerTreatment.MIXING
SPLITS = {LayerTreatment.SPLIT, LayerTreatment.SPLIT_KRONECKER}

D = torch.float64


def test_layerwise_equals_generic(case):
    model, loss, X, y = case.make()
    fast = gram_matrix(model, loss, X, y, engine="layerwise")
    slow = gram_matrix(model, loss, X, y, engine="generic")
    report_close(fast, slow, name="layer-wise Gram")
    res = ggn_spectrum(model, loss, X, y, top_k=1)
    assert res.engine_report.strategy is not Strategy.GENERIC, res.engine_report


@pytest.mark.parametrize("strategy", ["columns", "bn_split"])
@pytest.mark.parametrize(
    "name, upstream, downstream",
    [
        ("bn1d-train-ce", ["0"], ["3"]),
        ("bn1d-eval-ce", [], ["0", "3"]),
        ("resnet-bn-train-ce", ["0", "1.conv1"], ["1.conv2", "3"]),
    ],
)
def test_layers_downstream_of_batchnorm_are_local(name, upstream, downstream, strategy):
    """Columns find locality numerically; bn_split from the statistics directions."""
    model, loss, X, y = next(c for c in CASES if c.name == name).make()
    if name == "bn1d-eval-ce":
        strategy = None  # per-sample path
    report = ggn_spectrum(model, loss, X, y, top_k=1, strategy=strategy).engine_report
    mixed = {MIXING} if strategy == "columns" else SPLITS
    assert all(report.layers[n] in mixed for n in upstream), report
    assert all(report.layers[n].local for n in downstream), report


def test_weight_used_outside_its_layer_leaves_that_layer_generic():
    """A parent reuses ``fc.weight`` directly: per-layer formulas would miss that use.

    The capture counts the calls that read each parameter and leaves ``fc`` generic,
    with the reason in the report; every other layer stays on the fast path.
    """

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)
            self.out = torch.nn.Linear(3, 2)

        def forward(self, x):
            h = torch.tanh(self.fc(x))
            return self.out(h @ self.fc.weight)

    torch.manual_seed(0)
    model, loss = Tied().double(), torch.nn.CrossEntropyLoss()
    X, y = torch.randn(4, 3, dtype=D), torch.tensor([0, 1, 1, 0])
    res = ggn_spectrum(model, loss, X, y)
    report = res.engine_report
    assert report.strategy is Strategy.PER_SAMPLE and report.fallback is None
    assert report.layers["fc.weight"] is LayerTreatment.GENERIC
    assert report.layers["out"] is LayerTreatment.KRONECKER
    assert "also read outside" in report.reasons["fc"]
    assert_spectrum_matches(res.eigenvalues, dense_ggn(model, loss, X, y))


def test_mixing_found_late_restarts_with_layer_explicit():
    """Only the last sample reads another sample: the first chunks look local."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), MixLast(), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()
    loss = torch.nn.MSELoss()
    X, y = torch.randn(5, 3, dtype=D), torch.randn(5, 2, dtype=D)
    res = ggn_spectrum(model, loss, X, y, chunk=1)
    assert res.path.name == "full_batch"
    assert res.engine_report.strategy is Strategy.COLUMNS
    assert res.engine_report.layers == {"0": MIXING, "3": LayerTreatment.KRONECKER}
    assert_spectrum_matches(res.eigenvalues, dense_ggn(model, loss, X, y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetric_rank_k_update(dtype):
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(7, 11, generator=gen, dtype=dtype)
    G = torch.randn(7, 7, generator=gen, dtype=dtype)
    G = G + G.T
    expected = G + B @ B.T
    symmetric_rank_k_update(G, B)
    report_close(
        G, expected, rtol=1e-5 if dtype == torch.float32 else 1e-12, name="syrk"
    )


def test_conv_kronecker_and_explicit_forms_agree():
    """Both forms for a weight-sharing layer equal ``Σ_l V_iᵀ V_j`` from explicit ``V``."""
    gen = torch.Generator().manual_seed(2)
    NS, C, P, O, I = 3, 2, 4, 5, 6
    g = torch.randn(NS, C, P, O, generator=gen, dtype=D)
    A = torch.randn(NS, P, I, generator=gen, dtype=D)
    V = torch.einsum("ncpo,npi->ncoi", g, A).reshape(NS * C, -1)
    gram = torch.zeros(NS * C, NS * C, dtype=D)
    add_kron_blocks(gram, g, input_kernel(A, D))
    report_close(gram, V @ V.T, name="Kronecker blocks")
    gram = torch.zeros(NS * C, NS * C, dtype=D)
    for _, rows in DenseOperand(A[:, None], O).explicit(g, budget=10**9):
        symmetric_rank_k_update(gram, rows)
    report_close(gram, V @ V.T, name="explicit rows")


def test_explicit_channel_chunks_under_small_budget():
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(2, 3, 4, 6, generator=gen, dtype=D)
    A = torch.randn(2, 4, 5, generator=gen, dtype=D)
    V = torch.einsum("ncpo,npi->ncoi", g, A).reshape(6, -1)
    gram = torch.zeros(6, 6, dtype=D)
    # one output channel per chunk
    chunks = list(DenseOperand(A[:, None], 6).explicit(g, budget=1))
    assert [c.stop - c.start for c, _ in chunks] == [5] * 6
    for cols, rows in chunks:
        report_close(rows, V[:, cols], name="chunk")
        symmetric_rank_k_update(gram, rows)
    report_close(gram, V @ V.T, name="chunked explicit")


def test_memory_budget_is_enforced_with_a_clear_error():
    """Too small for the call: refused up front; too small for the blocks: the engine."""
    model, loss, X, y = next(c for c in CASES if c.name == "bn2d-train-ce").make()
    with pytest.raises(MemoryBudgetExceeded, match="more than memory_budget"):
        gram_matrix(model, loss, X, y, memory_budget=1000)
    # the engine's work budget: Gram and S fit, the mixing conv's explicit blocks
    # do not
    lin = linearize(model, loss, X, y)
    with pytest.raises(MemoryBudgetExceeded, match="memory_budget=.* GiB"):
        layerwise_gram(lin, memory_budget=4000, strategy=Strategy.COLUMNS)


def test_unknown_engine_raises():
    model, loss, X, y = CASES[0].make()
    with pytest.raises(ValueError, match="engine must be one of"):
        gram_matrix(model, loss, X, y, engine="fast")


@pytest.mark.parametrize("bn", [False, True])
def test_dead_branch_and_unused_layers(bn):
    """A layer that runs but does not reach the output, and one that never runs."""

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 4)
            self.norm = torch.nn.BatchNorm1d(4) if bn else torch.nn.Identity()
            self.dead = torch.nn.Linear(4, 2)
            self.never = torch.nn.Linear(4, 2)
            self.out = torch.nn.Linear(4, 2)

        def forward(self, x):
            h = torch.tanh(self.norm(self.fc(x)))
            self.dead(h)  # computed, unused
            return self.out(h)

    torch.manual_seed(4)
    model, loss = Branchy().double(), torch.nn.CrossEntropyLoss()
    X, y = torch.randn(5, 3, dtype=D), torch.tensor([0, 1, 1, 0, 1])
    res = ggn_spectrum(model, loss, X, y, eigenvectors=True)
    assert res.engine_report.strategy is not Strategy.GENERIC
    G = dense_ggn(model, loss, X, y)
    assert_spectrum_matches(res.eigenvalues, G)
    E = res.eigenvectors
    report_close(G @ E.T, E.T * res.eigenvalues, name="G e")
