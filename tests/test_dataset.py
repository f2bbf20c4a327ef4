"""Data-set GGN over uneven batches against ``Σ_b w_b dense_ggn_b``."""

from __future__ import annotations

import pytest
import torch
from cases import CASES
from utils import (
    RTOL,
    assert_spectrum_matches,
    assert_state_equal,
    batch_of,
    reduction_of,
    report_close,
    state_of,
    take,
    take_targets,
)

from lowrank_ggn import GramMemoryError, ggn_spectrum_dataset
from lowrank_ggn.reference import dense_ggn


def _batches(case):
    """The case's batch and a second, smaller one (own BN statistics)."""
    model, loss, X, y = case.make()
    N = batch_of(X)
    k = max(1, N - 1) if N > 1 else 1
    backwards = list(range(N))[::-1][:k]
    X2, y2 = take(X, backwards), take_targets(y, backwards)
    if isinstance(X, torch.Tensor) and X.is_floating_point():  # new values too
        X2 = 0.7 * X2 + 0.1
    return model, loss, [(X, y), (X2, y2)]


def _dense_dataset_ggn(model, loss, batches):
    sizes = [batch_of(X) for X, _ in batches]
    total = sum(sizes)
    return sum(
        (n / total if reduction_of(loss) == "mean" else 1.0) * dense_ggn(model, loss, X, y)
        for n, (X, y) in zip(sizes, batches)
    )


def test_dataset_spectrum_matches_dense(case):
    model, loss, batches = _batches(case)
    before = state_of(model)
    res = ggn_spectrum_dataset(model, loss, iter(batches), eigenvectors=True)
    assert_state_equal(before, model)
    G = _dense_dataset_ggn(model, loss, batches)
    assert res.batch_sizes == [batch_of(X) for X, _ in batches]
    assert_spectrum_matches(res.eigenvalues, G)
    E, lam = res.eigenvectors, res.eigenvalues
    residual = (G @ E.T - E.T * lam).norm(dim=0)
    assert residual.max() <= RTOL * lam[0], f"‖G e − λ e‖ = {residual.max():.3e}"


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.name in ("bn1d-train-ce", "cnn-pool-ce")], ids=str
)
def test_lanczos_matches_dense_top_k(case):
    model, loss, batches = _batches(case)
    dense = ggn_spectrum_dataset(model, loss, batches, top_k=3)
    before = state_of(model)
    lanczos = ggn_spectrum_dataset(
        model, loss, batches, top_k=3, solver="lanczos", eigenvectors=True
    )
    assert_state_equal(before, model)
    assert lanczos.solver == "lanczos"
    report_close(lanczos.eigenvalues, dense.eigenvalues, name="top-3")
    G = _dense_dataset_ggn(model, loss, batches)
    E, lam = lanczos.eigenvectors, lanczos.eigenvalues
    residual = (G @ E.T - E.T * lam).norm(dim=0)
    assert residual.max() <= 1e3 * RTOL * lam[0], f"{residual.max():.3e}"


def test_weights_and_sum_reduction():
    model, loss, batches = _batches(CASES[1])  # mlp-ce-sum
    res = ggn_spectrum_dataset(model, loss, batches)
    assert res.weights == [1.0, 1.0]
    model, loss, batches = _batches(CASES[0])  # mlp-ce-mean, sizes 6 and 5
    res = ggn_spectrum_dataset(model, loss, batches)
    assert res.weights == [6 / 11, 5 / 11]


def test_memory_guard_fails_early_with_the_size():
    model, loss, batches = _batches(CASES[0])
    with pytest.raises(GramMemoryError, match=r"33 rows.*solver='lanczos'"):
        ggn_spectrum_dataset(model, loss, batches, memory_budget=1000)
    consumed = []

    def stream():
        for item in batches * 3:
            consumed.append(1)
            yield item

    with pytest.raises(GramMemoryError, match="after 2 batches"):
        ggn_spectrum_dataset(model, loss, stream(), memory_budget=20_000)
    assert len(consumed) == 2  # stopped before allocating the rest


def test_progress_bar_on_stderr(capsys):
    pytest.importorskip("tqdm")
    model, loss, batches = _batches(CASES[0])
    ggn_spectrum_dataset(model, loss, batches, progress=True, top_k=1)
    assert "GGN batches" in capsys.readouterr().err
    ggn_spectrum_dataset(model, loss, batches, top_k=1)
    assert "GGN batches" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("batches", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "empty"),
        ([torch.zeros(2)], {}, TypeError, r"batches\[0\] must be a pair"),
        ("pair", {}, TypeError, "iterable of"),
        ("ok", {"solver": "arpack"}, ValueError, "solver must be"),
        ("ok", {"solver": "lanczos"}, ValueError, "pass top_k"),
        ("ok", {"solver": "lanczos", "top_k": 99}, ValueError, "smaller than"),
    ],
)
def test_bad_arguments(batches, kwargs, error, match):
    model, loss, ok = _batches(CASES[0])
    if isinstance(batches, str):
        batches = {"ok": ok, "pair": ok[0]}[batches]
    with pytest.raises(error, match=match):
        ggn_spectrum_dataset(model, loss, batches, **kwargs)
