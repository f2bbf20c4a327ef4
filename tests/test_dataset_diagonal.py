"""The data-set GGN diagonal against brute force, float64, over the shared case list.

``ggn_diagonal_dataset`` over two batches (each with its own forward pass, so
train-mode BatchNorm uses each batch's statistics) against
``diag(Σ_b w_b dense_ggn_b)``; Monte-Carlo draws per global batch index; bad input.
Two processes against one: ``tests/distributed_check.py``.
"""

from __future__ import annotations

import pytest
import torch
from cases import CASES
from test_dataset import _batches, _dense_dataset_ggn
from test_diagonal import RTOL_DIAG
from torch import nn
from utils import assert_state_equal, report_close, state_of

from lowrank_ggn import GGN, ggn_diagonal_dataset, ggn_spectrum_dataset


def test_dataset_diagonal_matches_dense(case):
    model, loss, batches = _batches(case)
    before = state_of(model)
    res = ggn_diagonal_dataset(model, loss, iter(batches))
    assert_state_equal(before, model)
    G = _dense_dataset_ggn(model, loss, batches)
    report_close(res.flat, G.diagonal(), RTOL_DIAG, "data-set diagonal")
    assert res.num_batches == 2 and res.bytes_exchanged == 0
    assert [d.shape for d in res.per_param] == [
        p.shape for p in model.parameters() if p.requires_grad
    ]


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.name in ("bn1d-train-ce", "mlp-mse")], ids=str
)
def test_dataset_trace_is_the_dataset_spectrum_sum(case):
    model, loss, batches = _batches(case)
    res = ggn_diagonal_dataset(model, loss, batches)
    spectrum = ggn_spectrum_dataset(model, loss, batches, rtol=0.0)
    report_close(res.trace, spectrum.eigenvalues.sum(), RTOL_DIAG, "trace")


def test_sum_reduction_adds_the_batches():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)
    )
    model = model.double()
    loss = nn.CrossEntropyLoss(reduction="sum")
    X = torch.randn(9, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (9,))
    batches = [(X[:5], y[:5]), (X[5:], y[5:])]
    res = ggn_diagonal_dataset(model, loss, batches)
    G = _dense_dataset_ggn(model, loss, batches)
    report_close(res.flat, G.diagonal(), RTOL_DIAG, "sum reduction")
    assert res.num_samples == 9


def test_mc_draws_follow_the_global_batch_index():
    """Batch ``b`` draws from a generator seeded ``s + b``: the same estimate as the
    per-batch calls with those generators, whatever the list is split into."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    loss = nn.CrossEntropyLoss()
    X = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    batches = [(X[:4], y[:4]), (X[4:], y[4:])]
    res = ggn_diagonal_dataset(
        model, loss, batches, mc_samples=2, generator=torch.Generator().manual_seed(3)
    )
    seed = int(torch.randint(2**62, (1,), generator=torch.Generator().manual_seed(3)))
    expected = sum(
        X_b.shape[0]
        / 10
        * GGN(
            model,
            loss,
            X_b,
            y_b,
            mc_samples=2,
            generator=torch.Generator().manual_seed(seed + b),
        )
        .diagonal()
        .flat
        for b, (X_b, y_b) in enumerate(batches)
    )
    report_close(res.flat, expected, RTOL_DIAG, "MC draws")
    assert res.mc_samples == 2


def _problem():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    X = torch.randn(4, 3, dtype=torch.float64)
    return model, nn.CrossEntropyLoss(), X, torch.tensor([0, 1, 1, 0])


@pytest.mark.parametrize(
    "make_batches, kwargs, error, match",
    [
        (lambda X, y: (X, y), {}, TypeError, "iterable of \\(inputs, targets\\) pairs"),
        (lambda X, y: 3, {}, TypeError, "iterable of \\(inputs, targets\\) pairs"),
        (lambda X, y: [], {}, ValueError, "batches is empty"),
        (lambda X, y: [(X, y)], {"subsampling": [0]}, ValueError, "no subsampling"),
        (lambda X, y: [(X, y)], {"mc_samples": 0}, ValueError, "mc_samples"),
        (lambda X, y: [(X, y)], {"timeout": -1.0}, ValueError, "timeout"),
        (lambda X, y: [(X, y)], {"chunk": 0}, ValueError, "chunk"),
    ],
)
def test_bad_input_is_refused_clearly(make_batches, kwargs, error, match):
    model, loss, X, y = _problem()
    before = state_of(model)
    with pytest.raises(error, match=match):
        ggn_diagonal_dataset(model, loss, make_batches(X, y), **kwargs)
    assert_state_equal(before, model)
