"""``memory_budget`` bounds the process: measured peaks, up-front refusals, warnings.

Peaks are resident memory measured in child processes (``benchmarks/bench_memory.py``
workers: the kernel's peak mark ``VmHWM``, reset before each call), never ``tracemalloc``
and never ``ru_maxrss`` (which holds the parent's peak: the pytest worker's).
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from cases import CASES
from torch import nn

from lowrank_ggn import GGN, ggn_spectrum
from lowrank_ggn.core.budget import MemoryBudgetExceeded, MemoryBudgetWarning
from lowrank_ggn.core.state import fingerprint

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_memory.py"
MiB = 2**20
linux = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc"
)


def _bench_worker(model: str, N: int, budgets: list[int]) -> list[dict]:
    cmd = [sys.executable, str(BENCH), "--worker", model, str(N)]
    cmd += [str(b) for b in budgets]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@linux
@pytest.mark.parametrize("model", ["mlp", "cnn", "cnn-bn", "transformer"])
def test_measured_peak_stays_within_budget_plus_slack(model):
    """Peak − baseline ≤ budget + slack, or a refusal before the batch's forward pass.

    The same call's peak varies with what else runs on the machine (3c3d-BN, N = 32,
    256 MiB: 318–332 MB alone, 326–365 MB beside another process, old and new code
    alike): a budget over by its slack in one worker is measured once more, and the
    smaller peak counts. A real excess shows in both.
    """
    sys.path.insert(0, str(BENCH.parent))
    from bench_memory import slack

    budgets = [64 * MiB, 256 * MiB]
    rows = _bench_worker(model, 32, budgets)
    over = [
        r
        for r in rows
        if "refused" not in r and r["peak"] > r["budget"] + slack(r["budget"])
    ]
    if over:
        again = {r["budget"]: r for r in _bench_worker(model, 32, budgets)}
        for r in over:
            r["peak"] = min(r["peak"], again[r["budget"]].get("peak", r["peak"]))
    for row in rows:
        if "refused" in row:
            assert row["largest_batch_seen"] <= 4, row  # only the probe ran
            continue
        assert row["peak"] <= row["budget"] + slack(row["budget"]), row
        assert row["reported_peak"] is not None and row["reported_peak"] > 0


_WORKER = """
import json, sys, warnings
sys.path.insert(0, {tests!r})
import torch
from cases import CASES
from lowrank_ggn import ggn_spectrum
from lowrank_ggn.core.footprint import peak_resident_bytes, reset_peak_resident, resident_bytes
warnings.simplefilter("ignore")
out = []
for case in CASES:
    model, loss, X, y = case.make()
    ggn_spectrum(model, loss, X, y)  # warm-up
    reset_peak_resident()
    base = resident_bytes()
    try:
        s = ggn_spectrum(model, loss, X, y, memory_budget={budget})
        est = sum(s.engine_report.memory_estimate.values())
    except MemoryError:
        est = None
    out.append([case.name, peak_resident_bytes() - base, est])
print(json.dumps(out))
"""


@linux
def test_shared_cases_stay_within_a_small_budget():
    """Every shared case, in one child process, under an 8 MiB budget (+ slack)."""
    sys.path.insert(0, str(BENCH.parent))
    from bench_memory import slack

    budget = 8 * MiB
    code = _WORKER.format(tests=str(Path(__file__).parent), budget=budget)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == len(CASES)
    for name, peak, _ in rows:
        assert peak <= budget + slack(budget), (name, peak)


def _mlp(N: int = 64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    X, y = torch.randn(N, 256), torch.randint(0, 10, (N,))
    return model, nn.CrossEntropyLoss(), X, y


def test_refusal_comes_before_the_batch_forward_pass_and_names_what_fits():
    model, loss, X, y = _mlp(256)
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    before = fingerprint(model)
    with pytest.raises(MemoryBudgetExceeded, match="memory_budget") as err:
        ggn_spectrum(model, loss, X, y, memory_budget=4 * MiB)
    assert max(seen) <= 4  # the probe only
    assert fingerprint(model) == before
    msg = str(err.value)
    assert "Gram matrices" in msg and "recorded forward pass" in msg
    fits = int(msg.split("a batch of at most ")[1].split()[0])
    assert 0 < fits < 256
    # the batch it names does fit
    ggn_spectrum(model, loss, X[:fits], y[:fits], memory_budget=4 * MiB)
    # still a ValueError, as budget refusals were
    assert isinstance(err.value, ValueError)


def test_report_holds_the_estimate_and_the_measured_peak():
    model, loss, X, y = _mlp()
    g = GGN(model, loss, X, y, memory_budget=64 * MiB)
    g.spectrum(top_k=3)
    rep = g.engine_report
    assert rep.memory_budget == 64 * MiB
    assert rep.memory_estimate and sum(rep.memory_estimate.values()) <= 64 * MiB
    assert any("Gram" in k for k in rep.memory_estimate)
    if Path("/proc/self/status").exists():
        assert rep.memory_peak is not None and rep.memory_peak >= 0


def test_a_budget_that_forces_a_much_slower_strategy_warns_with_both_estimates():
    torch.manual_seed(0)
    # wide activations, few parameters: per_sample's rows [NC, 2048] do not fit
    model = nn.Sequential(nn.Linear(16, 2048), nn.Tanh(), nn.Linear(2048, 10))
    X, y = torch.randn(128, 16), torch.randint(0, 10, (128,))
    free = ggn_spectrum(model, nn.CrossEntropyLoss(), X, y, top_k=3)
    assert free.engine_report.strategy.value == "per_sample"
    need = free.engine_report.memory_estimate
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tight = ggn_spectrum(
            model,
            nn.CrossEntropyLoss(),
            X,
            y,
            top_k=3,
            memory_budget=sum(need.values()) + 8 * MiB,
        )
    assert tight.engine_report.strategy.value == "streamed"
    slow = [w for w in caught if issubclass(w.category, MemoryBudgetWarning)]
    assert slow and "per_sample" in str(slow[0].message)
    torch.testing.assert_close(
        tight.eigenvalues, free.eigenvalues, rtol=1e-4, atol=1e-7
    )


def test_infinite_budget_skips_the_probe():
    model, loss, X, y = _mlp(8)
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    ggn_spectrum(model, loss, X, y, memory_budget=float("inf"))
    assert seen.count(4) == 0  # no probe forward pass


@pytest.mark.parametrize("case", CASES[:6], ids=repr)
def test_estimate_parts_are_positive_on_shared_cases(case):
    model, loss, X, y = case.make()
    s = ggn_spectrum(model, loss, X, y, memory_budget=2**30)
    assert all(v >= 0 for v in s.engine_report.memory_estimate.values())
