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


def test_optimizer_defaults_study_quick(tmp_path):
    """The defaults study runs; its summary marks the rows of today's defaults."""
    from lowrank_ggn.optim.damped_newton import (
        DEFAULT_COMPLEMENT_LR,
        DEFAULT_DAMPING,
        DEFAULT_MOMENTUM,
    )

    data = tmp_path / "defaults.json"
    run(EXPERIMENTS / "optimizers" / "defaults_study.py", "--out", str(data))
    result = json.loads(data.read_text())
    assert result["defaults"]["complement_lr"] == DEFAULT_COMPLEMENT_LR
    for prob in result["problems"]:
        sgd = [r for r in prob["rows"] if r["optimizer"] == "SGD"]
        assert [r["settings"]["lr"] for r in sgd] == result["settings"]["sgd_lrs"]
        assert prob["tuned_sgd_loss"] == min(r["mean_train_loss"] for r in sgd)
        for r in prob["rows"]:
            if r["optimizer"] == "DampedNewton":
                assert r["is_default"] == (
                    r["settings"]
                    == {
                        "complement_lr": DEFAULT_COMPLEMENT_LR,
                        "momentum": DEFAULT_MOMENTUM,
                        "damping": DEFAULT_DAMPING,
                    }
                )
