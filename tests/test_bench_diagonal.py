"""The diagonal benchmark runs end to end in quick mode (times are not asserted)."""

from __future__ import annotations

import importlib.util
import json

from utils import run_quick_benchmark


def test_bench_diagonal_quick_mode(tmp_path):
    out = run_quick_benchmark("bench_diagonal.py", tmp_path)
    result = json.loads((out / "diagonal_quick.json").read_text())
    assert result["quick"] and result["machine"]["torch"]
    by = {(r["model"], r["method"]): r for r in result["records"]}
    plain, bn = by["tiny-plain", "lowrank_ggn"], by["tiny", "lowrank_ggn"]
    assert plain["route"] == bn["route"] == "layerwise"
    assert bn["strategy"] == "bn_split" and plain["peak_rss_bytes"] > 0
    for model in ("tiny-plain", "tiny"):
        spec = by[model, "spectrum"]
        assert spec["rel_dev_trace"] <= 1e-5, spec  # Σ λ = Σ diag in float32
    if importlib.util.find_spec("backpack") is not None:
        assert by["tiny-plain", "backpack"]["max_rel_dev"] <= 1e-5
        assert "BatchNorm" in by["tiny", "backpack"]["error"]  # train mode: refused
    if importlib.util.find_spec("curvlinops") is not None:
        assert by["tiny-plain", "xdiag"]["max_rel_dev"] <= 1e-4  # exact at 2(NC+1)
        hutch = by["tiny-plain", "hutchinson"]
        assert hutch["matvecs_for_1pct"] > 0 and hutch["projected_1pct_s"] > 0
    assert "| model | N | method |" in (out / "diagonal_quick.md").read_text()
