"""The curvature-object benchmark runs end to end in quick mode (times not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_curvature.py"


def test_bench_curvature_quick_mode(tmp_path):
    out = tmp_path / "results"
    cwd = tmp_path / "elsewhere"  # the script must not depend on the working directory
    cwd.mkdir()
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out)]
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "curvature_quick.json").read_text())["rows"]
    by = {(r["model"], r["kind"]): r for r in rows}
    assert set(by) == {
        (m, k) for m in ("3c3d", "3c3d-bn") for k in ("object", "functions")
    }
    N = rows[0]["N"]
    for model in ("3c3d", "3c3d-bn"):
        # the object: at most 3 passes plus the path check's probe of ≤ 4 samples
        assert by[model, "object"]["forward_passes"] <= 3 + 4 / N
        assert (
            by[model, "object"]["forward_passes"]
            < by[model, "functions"]["forward_passes"]
        )
    assert (out / "curvature_quick.md").stat().st_size > 0
