"""Every experiment runs end to end in quick mode, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"


def run(script: Path, *args: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", *args],
        capture_output=True,
        check=False,
        text=True,
        cwd=ROOT.parent,  # paths must not depend on the working directory
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def test_digits_spectrum_quick(tmp_path):
    pytest.importorskip("matplotlib")
    folder = EXPERIMENTS / "digits_spectrum"
    data = tmp_path / "results.json"
    run(folder / "run.py", "--out", str(data))
    result = json.loads(data.read_text())
    paths = {(r["label"], r["path"]) for r in result["runs"]}
    assert ("cnn-bn train", "full_batch") in paths
    assert ("cnn-bn eval", "per_sample") in paths
    assert all(r["eigenvalues"] for r in result["runs"])
    run(folder / "plot.py", "--json", str(data), "--out", str(tmp_path))
    for suffix in ("pdf", "png"):
        assert (tmp_path / f"digits_spectrum_quick.{suffix}").stat().st_size > 0
