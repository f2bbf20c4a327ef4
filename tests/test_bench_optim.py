"""The damped Newton benchmark runs end to end in quick mode (timings not asserted)."""

from __future__ import annotations

import json
import math

from utils import run_quick_benchmark


def test_bench_optim_quick_mode(tmp_path):
    out = run_quick_benchmark("bench_optim.py", tmp_path, "--threads", "1")
    result = json.loads((out / "optim_quick.json").read_text())
    assert result["quick"] and result["machine"]["torch"]
    assert [r["model"] for r in result["records"]] == ["tiny", "3c3d"]
    for r in result["records"]:
        assert set(r["seconds"]) == {"spectrum", "step_constant", "step_bootstrap"}
        assert math.isfinite(r["ratio_constant"]) and r["ratio_constant"] > 0
        calls = r["calls"]
        # a step runs the forward passes and the Gram engine's passes of the spectrum
        for step in ("step_constant", "step_bootstrap"):
            assert calls[step]["forward_passes"] == calls["spectrum"]["forward_passes"]
            assert calls[step]["engine_passes"] == calls["spectrum"]["engine_passes"]
            assert (
                calls[step]["forward_passes_reported"] == calls[step]["forward_passes"]
            )
        assert calls["step_constant"]["num_directions"] == 10
    assert "Damped Newton step vs spectrum" in (out / "optim_quick.md").read_text()
