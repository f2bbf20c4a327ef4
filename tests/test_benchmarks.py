"""The benchmark script runs end to end in quick mode (timings are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gram.py"


def test_benchmark_quick_mode(tmp_path):
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--methods",
        "lowrank_ggn",
        "--out",
        str(tmp_path),
        "--threads",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "gram_quick.json").read_text())
    recs = [r for r in result["records"] if r["method"] == "lowrank_ggn"]
    assert len(recs) == 2 and all("error" not in r and r["time_s"] > 0 for r in recs)
    assert recs[0]["path"] == "full_batch"  # the tiny benchmark net has train-mode BN
    # the floor of the call's work, measured in the same worker (harness.floor)
    for r in recs:
        parts = [r[f"floor_{p}_s"] for p in ("forward", "backward", "gram", "eigh")]
        assert all(s >= 0 for s in parts) and r["floor_s"] == sum(parts) > 0, r
        assert r["floor_gram_shape"] == [r["N"] * 3, r["explicit_params"]]
        assert 0 < r["floor_gram_block_columns"] <= r["explicit_params"]
        assert r["time_over_floor"] == r["time_s"] / r["floor_s"]
    assert (tmp_path / "gram_quick.png").stat().st_size > 0
    md = (tmp_path / "gram_quick.md").read_text()
    assert "| lowrank_ggn |" in md and "time / floor" in md
