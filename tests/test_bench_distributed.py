"""The distributed benchmark runs end to end in quick mode (times not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_distributed.py"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_bench_distributed_quick_mode(tmp_path):
    out = tmp_path / "results"
    cwd = tmp_path / "elsewhere"  # the script must not depend on the working directory
    cwd.mkdir()
    # the Lanczos path is covered by tests/test_distributed.py; spawning is slow
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--solvers",
        "dense",
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "distributed_quick.json").read_text())["rows"]
    assert {(r["solver"], r["world"], r["rank"]) for r in rows} == {
        ("dense", 1, 0),
        ("dense", 2, 0),
        ("dense", 2, 1),
    }
    for r in rows:
        assert r["max_rel_diff_vs_one_process"] <= 1e-4  # float32
        assert (r["bytes_exchanged"] > 0) == (r["world"] > 1)
