"""The model-zoo benchmark runs end to end in quick mode (timings are not asserted)."""

from __future__ import annotations

import importlib.util
import json

from utils import run_quick_benchmark
from zoo_imports import zoo

zoo()  # skips without timm and transformers


def test_bench_zoo_quick_mode(tmp_path):
    out = run_quick_benchmark("bench_zoo.py", tmp_path, "--threads", "1")
    result = json.loads((out / "zoo_quick.json").read_text())
    assert result["quick"] and result["machine"]["torch"]
    peers = importlib.util.find_spec("curvlinops") is not None
    parts = {r["part"] for r in result["records"]}
    assert parts == {"zoo", "resnet18", "gpt2", "lm50k"}
    for r in result["records"]:
        assert "error" not in r, r
        if r["method"] == "curvlinops" and not peers:
            assert r["skipped"] == "not installed", r
            continue
        assert r["time_s"] > 0 and r["top_eigenvalues"], r
        if r["method"] == "lowrank_ggn":  # the fast path, as the zoo tests assert
            assert r["fallback"] is None and r["strategy"] != "generic", r
    assert {c["part"] for c in result["ratios"]} >= {"gpt2"}
    assert "| part | model |" in (out / "zoo_quick.md").read_text()
