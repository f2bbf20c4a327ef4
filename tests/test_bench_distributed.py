"""The distributed benchmark runs end to end in quick mode (times not asserted)."""

from __future__ import annotations

import json

import pytest
import torch
from utils import run_quick_benchmark


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_bench_distributed_quick_mode(tmp_path):
    # the Lanczos path is covered by tests/test_distributed.py; spawning is slow
    out = run_quick_benchmark("bench_distributed.py", tmp_path, "--solvers", "dense")
    rows = json.loads((out / "distributed_quick.json").read_text())["rows"]
    assert {(r["solver"], r["world"], r["rank"]) for r in rows} == {
        ("dense", 1, 0),
        ("dense", 2, 0),
        ("dense", 2, 1),
    }
    for r in rows:
        assert r["max_rel_diff_vs_one_process"] <= 1e-4  # float32
        assert (r["bytes_exchanged"] > 0) == (r["world"] > 1)
