"""Spectrum approximations of one digits batch, with and without train-mode BatchNorm.

ViViT's Figure 1 (Dangel, Tatzel & Hennig, TMLR 2022, https://arxiv.org/abs/2106.02624)
on the zoo's ``cnn`` and ``cnn-bn`` (BatchNorm in train mode), trained briefly with SGD
(seeded), float64. For one batch of ``N`` digits, the nonzero GGN spectrum

* exactly (:func:`lowrank_ggn.ggn_spectrum`);
* with Monte-Carlo loss-Hessian factors, ``M = 1`` sample per datum (``mc_samples=1``);
* with curvature sub-sampling: the GGN of a random quarter of the batch, rescaled by
  ``N/|S|``, forward pass on the whole batch (``subsampling=``);
* per layer: the eigenvalues of the block-diagonal approximation
  ``diag(G_11, …, G_LL)``, one block per parameterised layer (``param_groups=``),

and the top-k error of each approximation, ``|λ̂_k − λ_k| / λ_k`` for ``k ≤ top_k``.
In quick mode the exact spectrum is also checked against the dense reference
(``eigvalsh`` of :func:`lowrank_ggn.reference.dense_ggn`).

    python experiments/spectrum_approximations/run.py [--quick] [--out PATH]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/_common.py

from _common import run_main, timed  # noqa: E402

from lowrank_ggn import ggn_block_spectra, ggn_spectrum, per_layer_groups  # noqa: E402
from lowrank_ggn.app.data import digits_batch  # noqa: E402
from lowrank_ggn.app.models import build_model, num_params  # noqa: E402
from lowrank_ggn.app.training import train  # noqa: E402
from lowrank_ggn.reference import dense_ggn  # noqa: E402

SEED = 0
FULL = {
    "batch_size": 128,
    "train_steps": 150,
    "subsample_fraction": 0.25,
    "mc_samples": 1,
    "top_k": 20,
    "dense_reference": False,
}
QUICK = {
    "batch_size": 8,
    "train_steps": 2,
    "subsample_fraction": 0.5,
    "mc_samples": 1,
    "top_k": 5,
    "dense_reference": True,
}
#: (label, zoo model); BatchNorm models stay in train mode (batch statistics).
MODELS = [("cnn", "cnn"), ("cnn-bn (train mode)", "cnn-bn")]


def topk_error(approx: torch.Tensor, exact: torch.Tensor, k: int) -> list[float | None]:
    """``|λ̂_j − λ_j| / λ_j`` for ``j ≤ k`` (``None`` where either has fewer)."""
    out = []
    for j in range(k):
        if j < approx.numel() and j < exact.numel():
            out.append(float((approx[j] - exact[j]).abs() / exact[j]))
        else:
            out.append(None)
    return out


def compute(s: dict) -> dict:
    N, k, loss = s["batch_size"], s["top_k"], nn.CrossEntropyLoss()
    X, y = digits_batch(N, SEED, torch.float64)
    gen = torch.Generator().manual_seed(SEED)
    subset = torch.randperm(N, generator=gen)[
        : max(2, round(s["subsample_fraction"] * N))
    ]
    runs = []
    for label, name in MODELS:
        model = build_model(name, SEED, torch.float64)
        if s["train_steps"]:
            train(model, "ce", s["train_steps"], SEED, torch.float64, "cpu", name)
        model.train()
        spectra, seconds = {}, {}
        exact, seconds["exact"] = timed(ggn_spectrum, model, loss, X, y, progress=False)
        spectra["exact"] = exact.eigenvalues
        mc, seconds["mc"] = timed(
            ggn_spectrum,
            model,
            loss,
            X,
            y,
            mc_samples=s["mc_samples"],
            generator=torch.Generator().manual_seed(SEED),
            progress=False,
        )
        spectra["mc"] = mc.eigenvalues
        sub, seconds["subsampled"] = timed(
            ggn_spectrum, model, loss, X, y, subsampling=subset, progress=False
        )
        spectra["subsampled"] = sub.eigenvalues
        groups = per_layer_groups(model)
        blocks, seconds["block_diagonal"] = timed(
            ggn_block_spectra, model, loss, X, y, groups, progress=False
        )
        spectra["block_diagonal"] = torch.cat([b.eigenvalues for b in blocks]).sort(
            descending=True
        )[0]
        run = {
            "label": label,
            "model": name,
            "bn_mode": "train" if "bn" in name else "none",
            "num_params": num_params(model),
            "num_columns": exact.num_columns,
            "path": exact.path.name,
            "strategy": str(exact.engine_report.strategy),
            "blocks": [g["name"] for g in groups],
            "subset_size": int(subset.numel()),
            "eigenvalues": {m: v.tolist() for m, v in spectra.items()},
            "topk_rel_error": {
                m: topk_error(v, spectra["exact"], k)
                for m, v in spectra.items()
                if m != "exact"
            },
            "trace": {m: float(v.sum()) for m, v in spectra.items()},
            "seconds": seconds,
        }
        if s["dense_reference"]:
            ref = torch.linalg.eigvalsh(dense_ggn(model, loss, X, y)).flip(0)
            top = spectra["exact"]
            run["dense_reference_max_rel_dev"] = float(
                ((top - ref[: top.numel()]).abs() / ref[0]).max()
            )
        runs.append(run)
    return {"loss": "CrossEntropyLoss(mean)", "dtype": "float64", "runs": runs}


if __name__ == "__main__":
    run_main(__doc__, HERE, compute, FULL, QUICK, SEED)
