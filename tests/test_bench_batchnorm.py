"""The BatchNorm benchmark runs end to end in quick mode (timings are not asserted)."""

from __future__ import annotations

import json

from utils import run_quick_benchmark

PARTS = {"bn_vs_plain", "resnet18", "lanczos"}


def test_bench_batchnorm_quick_mode(tmp_path):
    out = run_quick_benchmark("bench_batchnorm.py", tmp_path, "--threads", "1")
    result = json.loads((out / "batchnorm_quick.json").read_text())
    assert set(result["parts"]) == PARTS
    assert {"cpu", "cores", "torch"} <= set(result["machine"])
    for part in PARTS:
        records = result["parts"][part]["records"]
        assert records, part
        # every row is a measurement or a skip (an optional keyword this lowrank_ggn
        # lacks, a peer not installed); an error row is a failure
        for r in records:
            assert "error" not in r, r
            assert ("time_s" in r) + ("skipped" in r) == 1, r
    # the BN variant of the tiny net measured against its plain twin
    bn = result["parts"]["bn_vs_plain"]
    assert {r["model"] for r in bn["records"]} == {"tiny", "tiny-plain"}
    assert bn["ratios"] and bn["ratios"][0]["N"] == 8
    # the floor of the work, measured in each full-spectrum worker (harness.floor)
    for r in bn["records"]:
        if "time_s" in r and r.get("explicit_params") is not None:
            assert (
                r["floor_s"] > 0 and r["time_over_floor"] == r["time_s"] / r["floor_s"]
            )
    assert any("floor_s" in r for r in bn["records"])
    resnet = result["parts"]["resnet18"]["records"]
    assert {r["model"] for r in resnet} == {"resnet18", "resnet18-eval"}
    assert all("peak_rss_bytes" in r for r in resnet if "time_s" in r)
    assert {t["part"] for t in result["targets"]} == {
        "bn_vs_plain",
        "resnet18",
        "lanczos",
    }
    md = (out / "batchnorm_quick.md").read_text()
    assert "Machine: cpu=" in md and "## Targets" in md and "time / floor" in md
