"""The transformer/MobileNet benchmark runs end to end in quick mode; its models are
the functions it claims (timings are not asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys

import torch
from utils import BENCHMARKS, run_quick_benchmark

if str(BENCHMARKS) not in sys.path:  # the benchmarks' harness
    sys.path.insert(0, str(BENCHMARKS))

from harness.models_zoo import Packed, build  # noqa: E402

METHODS = {"lowrank_ggn", "lowrank_ggn_f64", "previous", "curvlinops"}
AGREEMENT_RTOL = 1e-4  # float32 top-10, relative to λ_max (the benchmark's own bar)


def test_bench_models_quick_mode(tmp_path):
    # the transformer only: it exercises tuple inputs, the Packed wrapper of the
    # previous release and curvlinops' math attention backend; MobileNet below
    out = run_quick_benchmark(
        "bench_models.py", tmp_path, "--threads", "1", "--only", "transformer"
    )
    result = json.loads((out / "models_quick.json").read_text())
    assert result["quick"] and result["machine"]["torch"]
    records = result["records"]
    assert {r["method"] for r in records} == METHODS
    # curvlinops is a benchmark-only peer: CI's test environment lacks it
    peers = importlib.util.find_spec("curvlinops") is not None
    for r in records:
        assert "error" not in r, r
        if r["method"] == "curvlinops" and not peers:
            assert r["skipped"] == "not installed", r
            continue
        assert "skipped" not in r, r
        assert r["model"] == "transformer" and len(r["top_eigenvalues"]) == 10
    by = {r["method"]: r for r in records}
    assert by["lowrank_ggn"]["inputs"] == "tuple (tokens, mask)"
    assert by["lowrank_ggn"]["path"] == "per_sample"
    assert by["lowrank_ggn_f64"]["inputs"] == "tuple (tokens, mask)"
    if peers:
        assert by["curvlinops"]["sdpa_backend"] == "math"
    (row,) = result["comparisons"]
    assert row["reference"] == "lowrank_ggn"
    measured = METHODS - {"lowrank_ggn"} - (set() if peers else {"curvlinops"})
    assert set(row["agreement"]) == measured
    assert all(dev <= AGREEMENT_RTOL for dev in row["agreement"].values()), row
    assert [t["met"] for t in result["targets"]] == [None, None]  # no N = 128
    md = (out / "models_quick.md").read_text()
    assert "Machine: cpu=" in md and "## Targets" in md and "Cost model" in md


def test_packed_transformer_is_the_same_function():
    model, _, (tokens, mask), _ = build("transformer", 6, quick=True)
    packed, _, x, _ = build("transformer", 6, quick=True, packed=True)
    assert isinstance(packed, Packed) and x.dtype == torch.int64
    assert x.shape == (6, 2 * tokens.shape[1])
    assert torch.equal(x, Packed.pack(tokens, mask))
    torch.testing.assert_close(packed(x), model(tokens, mask), rtol=0, atol=0)
    # padding: lengths in [min(8, L), L], padded positions hold token 0
    assert (tokens[mask] == 0).all() and (tokens[~mask] > 0).all()


def test_mobilenet_eval_mode_depends_on_its_input():
    model, _, X, y = build("mobilenet", 8, quick=True)
    assert not model.training and X.shape == (8, 3, 16, 16) and y.max() < 10
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not (m.running_var == 1).all() for m in norms)
    with torch.no_grad():
        logits = model(X)
    # calibrated statistics keep the spread across samples (random statistics
    # shrink it layer by layer until the logits hardly depend on the input)
    assert logits.std(0).mean() > 0.1 * logits.std(1).mean()
