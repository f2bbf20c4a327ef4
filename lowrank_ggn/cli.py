"""Command-line entry point ``lowrank-ggn`` (placeholder demo; see issue 6)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from lowrank_ggn import ggn_spectrum
from lowrank_ggn.reference import dense_ggn


def main(argv: list[str] | None = None) -> int:
    """Print the GGN spectrum of a small BN net on random data and its trace check."""
    parser = argparse.ArgumentParser(prog="lowrank-ggn", description=main.__doc__)
    parser.add_argument(
        "--out", type=Path, default=Path("results"), help="output folder"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)
    ).double()
    X, y = torch.randn(32, 8, dtype=torch.float64), torch.randint(0, 4, (32,))
    loss = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    res = ggn_spectrum(model, loss, X, y, eigenvectors=True)
    elapsed = time.perf_counter() - t0
    trace = dense_ggn(model, loss, X, y).trace().item()
    print(f"path: {res.path}")
    print(
        f"{res.rank} nonzero eigenvalues of {res.num_columns}; top 5: {res.eigenvalues[:5].tolist()}"
    )
    print(
        f"sum of eigenvalues {res.eigenvalues.sum().item():.6e} vs dense trace {trace:.6e}; {elapsed:.3f} s"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "spectrum.json").write_text(
        json.dumps({"eigenvalues": res.eigenvalues.tolist()})
    )
    return 0
