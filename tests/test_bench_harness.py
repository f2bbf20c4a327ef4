"""The benchmarks' harness: measurement, worker rows, models, floor, result helpers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from utils import BENCHMARKS

if str(BENCHMARKS) not in sys.path:  # the benchmarks' harness
    sys.path.insert(0, str(BENCHMARKS))

from harness import floor, memory, models, passes, results, workers  # noqa: E402

linux = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="needs Linux /proc"
)


@linux
def test_measure_reads_the_calls_own_peak():
    out, cost = memory.measure(lambda: torch.ones(2**24).sum())  # 64 MiB
    assert out == 2**24 and cost["time_s"] > 0 and cost["peak_rss_reset"]
    assert cost["peak_rss_bytes"] - cost["baseline_rss_bytes"] >= 48 * 2**20
    _, cost = memory.measure(lambda: None, reset=False)
    assert "peak_rss_reset" not in cost
    assert cost["baseline_rss_bytes"] == memory.peak_rss_bytes()


def test_worker_failures_become_rows(tmp_path):
    py = [sys.executable, "-c"]
    assert workers.run_worker(py + ["print(1); print('{\"a\": 2}')"], 60) == {"a": 2}
    row = workers.run_worker(py + ["raise ValueError('no fit')"], 60)
    assert row == {"error": "ValueError: no fit"}
    row = workers.run_worker(py + ["import time; time.sleep(5)"], 0.5)
    assert row == {"error": "timed out after 0.5 s"}
    row = workers.run_worker(py + ["import os; os.kill(os.getpid(), 9)"], 60)
    assert row == {"error": "killed by signal 9 (out of memory?)"}


@pytest.mark.parametrize("name", models.MODELS)
def test_models_build_the_same_batch_from_a_seed(name):
    model, loss, X, y = models.build(name, 3, seed=1)
    again = models.build(name, 3, seed=1)
    assert model.training and torch.equal(X, again[2]) and torch.equal(y, again[3])
    assert model(X).shape == (3, models.num_classes(name))
    assert isinstance(loss, nn.CrossEntropyLoss)
    if name == "3c3d":
        assert sum(p.numel() for p in model.parameters()) == 895_210


def test_floor_counts_the_explicit_layers_only():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    assert floor.explicit_parameters(model, {"0": "kronecker", "2": "split"}) == 18
    split_kron = {"0": "split_kronecker", "2": "split"}
    assert floor.explicit_parameters(model, split_kron) == 18
    X, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    before = [p.clone() for p in model.parameters()]
    parts = floor.spectrum_floor(model, nn.CrossEntropyLoss(), X, y, 18, repeats=1)
    assert parts["floor_gram_shape"] == [18, 18] and parts["floor_s"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert floor.over_floor({"time_s": 2.0, "floor_s": 0.5}) == 4.0
    assert floor.over_floor({"time_s": 2.0}) is None


def test_forward_passes_count_vmapped_samples():
    model = nn.Linear(3, 2)
    counter = passes.ForwardPasses(model, 4)
    # per-sample calls see [1, 3] each: 8 samples, 2 passes of the batch
    torch.func.vmap(lambda x: model(x.unsqueeze(0)))(torch.ones(8, 3))
    model(torch.ones(4, 3))
    assert counter.passes() == 3.0
    counter.remove()


def test_result_helpers(tmp_path):
    recs = [{"method": "a", "time_s": 2.0}, {"method": "b", "error": "x|y"}]
    assert results.find(recs, method="b") is recs[1] and not results.ok(recs[1])
    assert (
        results.ratio(recs[0], recs[0]) == 1.0
        and results.ratio(recs[0], recs[1]) is None
    )
    assert results.failure(recs[1]) == "failed: x\\|y"
    assert results.rel_dev([1.0, 0.5], [2.0, 0.5, 0.1]) == 0.5
    assert results.targets_table([{"target": "t", "value": 1.5, "met": False}])[2] == (
        "| t | 1.50 | **no** |"
    )
    md = results.write_results(tmp_path, "x", {"records": recs}, "# x\n")
    assert md.read_text() == "# x\n"
    assert json.loads((tmp_path / "x.json").read_text())["records"] == recs
