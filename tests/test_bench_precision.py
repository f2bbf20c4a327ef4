"""The precision benchmark runs end to end in quick mode (timings are not asserted)."""

from __future__ import annotations

import json

from utils import run_quick_benchmark


def test_bench_precision_quick_mode(tmp_path):
    out = run_quick_benchmark("bench_precision.py", tmp_path, "--threads", "1")
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
