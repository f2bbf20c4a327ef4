"""The curvature-object benchmark runs end to end in quick mode (times not asserted)."""

from __future__ import annotations

import json

from utils import run_quick_benchmark


def test_bench_curvature_quick_mode(tmp_path):
    out = run_quick_benchmark("bench_curvature.py", tmp_path)
    rows = json.loads((out / "curvature_quick.json").read_text())["rows"]
    by = {(r["model"], r["kind"]): r for r in rows}
    assert set(by) == {
        (m, k) for m in ("3c3d", "3c3d-bn") for k in ("object", "functions")
    }
    N = rows[0]["N"]
    for model in ("3c3d", "3c3d-bn"):
        # the object: at most 3 passes plus the path check's probe of ≤ 4 samples
        # and the memory budget's probe of ≤ 4 samples
        assert by[model, "object"]["forward_passes"] <= 3 + 8 / N
        assert (
            by[model, "object"]["forward_passes"]
            < by[model, "functions"]["forward_passes"]
        )
    assert (out / "curvature_quick.md").stat().st_size > 0
