"""The precision benchmark runs end to end in quick mode (timings are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_precision.py"


def test_bench_precision_quick_mode(tmp_path):
    out = tmp_path / "results"
    cwd = tmp_path / "elsewhere"  # the script must not depend on the working directory
    cwd.mkdir()
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--threads", "1"]
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "precision_quick.json").read_text())
    records = result["parts"]["3c3d"]["records"]
    assert {r["variant"] for r in records} == {"native", "float64", "model64"}
    assert all("error" not in r for r in records), records
    assert {r["accumulate"] for r in records} == {"native", "float64"}
    (summary,) = result["parts"]["3c3d"]["summary"]
    # every returned float32 eigenvalue within its stated bound of the float64 truth
    assert summary["max_error_over_bound_native"] <= 1.0
    assert summary["max_error_over_bound_float64"] <= 1.0
    (digits,) = result["parts"]["digits"]["models"]
    assert digits["float32_float64_max_error_over_bound"] <= 1.0
    assert sum(digits["float32_float64"]) >= sum(digits["float32_native"])
    assert "Float32 spectra" in (out / "precision_quick.md").read_text()
