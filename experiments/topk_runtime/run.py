"""Time to the top-k GGN eigenpairs against k, 3c3d with and without BatchNorm.

ViViT's Figure 2b (Dangel, Tatzel & Hennig, TMLR 2022, https://arxiv.org/abs/2106.02624)
on DeepOBS' 3c3d (D = 895,210) and its train-mode BatchNorm variant, one seeded
synthetic CIFAR-10-shaped batch of ``N = 64`` (timing is the point, so the inputs are
``randn``), **float32**, cross-entropy, one CPU thread. Per k, the wall time of one
call that returns the top-k eigenvalues *and* eigenvectors:

* ``dense``: ``ggn_spectrum(top_k=k, eigenvectors=k)``: the whole ``NC × NC`` Gram and
  ``eigh`` (all eigenvalues), then ``k`` eigenvectors. Its cost hardly depends on
  ``k``, so it is timed once, at the largest ``k``: an upper bound for every smaller k;
* ``lanczos``: ``ggn_spectrum(top_k=k, eigenvectors=k, solver="lanczos")``, block
  Lanczos on the Gram operator;
* ``curvlinops``: curvlinops' ``GGNLinearOperator`` and ``scipy.sparse.linalg.eigsh``
  (``which="LA"``; BatchNorm built with ``track_running_stats=False``, the same
  train-mode function). Optional: skipped, and recorded as such, when curvlinops is
  not installed;
* ``power``: deflated power iteration (PyHessian's scheme, relative tolerance
  ``1e-3``, at most 100 products per eigenpair) on
  :func:`lowrank_ggn.ggn_linear_operator`.

Each method is warmed up once per model on a batch of 4. A method's larger k are
skipped once one call exceeds ``cap_s`` seconds (recorded), which bounds the run.
Each result also records its deviation from the dense top-k,
``max_j |λ̂_j − λ_j| / λ_1``.

    python experiments/topk_runtime/run.py [--quick] [--out PATH]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/_common.py

from _common import build_3c3d, cifar_batch, installed, run_main, timed  # noqa: E402

from lowrank_ggn import ggn_linear_operator, ggn_spectrum  # noqa: E402

SEED = 0
FULL = {
    "model": "3c3d",
    "batch_size": 64,
    "dtype": "float32",
    "k_lanczos": [1, 5, 20, 50],
    "k_peers": [1, 2, 5, 10, 20, 50],
    "cap_s": 30.0,
    "cap_lanczos_s": 150.0,
    "power_tol": 1e-3,
    "power_max_iter": 100,
}
QUICK = {
    "model": "tiny",
    "batch_size": 8,
    "dtype": "float32",
    "k_lanczos": [1, 2, 3],
    "k_peers": [1, 2, 3],
    "cap_s": 30.0,
    "cap_lanczos_s": 30.0,
    "power_tol": 1e-4,
    "power_max_iter": 300,
}
METHODS = ("dense", "lanczos", "curvlinops", "power")


def build(name: str, bn: bool, N: int, seed: int, running_stats: bool = True):
    """Model (train mode), inputs and targets: 3c3d, or a tiny conv net (quick mode)."""
    if name == "3c3d":
        X, y = cifar_batch(N, seed)
        return build_3c3d(bn, SEED, torch.float32, running_stats), X, y
    norm = [nn.BatchNorm2d(4, track_running_stats=running_stats)] if bn else []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3), *norm, nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)
        )
    gen = torch.Generator().manual_seed(seed)
    return (
        model.train(),
        torch.randn(N, 3, 8, 8, generator=gen),
        torch.randint(0, 10, (N,), generator=gen),
    )


def power_iteration(op, k: int, tol: float, max_iter: int) -> tuple[np.ndarray, int]:
    """Top-k eigenvalues by deflated power iteration; ``(values, products)``."""
    rng = np.random.default_rng(SEED)
    found, values, products = [], [], 0
    for _ in range(k):
        v = rng.standard_normal(op.shape[0]).astype(op.dtype)
        lam = None
        for _ in range(max_iter):
            for u in found:  # deflate: stay orthogonal to the pairs found
                v = v - (u @ v) * u
            v = v / np.linalg.norm(v)
            Gv = op @ v
            products += 1
            for u, mu in zip(found, values):
                Gv = Gv - mu * (u @ v) * u
            new = float(v @ Gv)
            v = Gv
            converged = lam is not None and abs(new - lam) <= tol * abs(lam)
            lam = new
            if converged:
                break
        found.append(v / np.linalg.norm(v))
        values.append(lam)
    return np.array(values), products


def method_call(method: str, model, X, y, k: int, s: dict):
    """One timed call's work: ``(top-k eigenvalues, details)``."""
    loss = nn.CrossEntropyLoss()
    if method in ("dense", "lanczos"):
        res = ggn_spectrum(
            model, loss, X, y, top_k=k, eigenvectors=k, solver=method, progress=False
        )
        assert res.eigenvectors.shape[0] == min(k, res.rank)
        rep = res.engine_report
        info = {"strategy": str(rep.strategy), "passes": dict(rep.passes)}
        return res.eigenvalues.tolist(), info
    if method == "curvlinops":
        from curvlinops import GGNLinearOperator
        from scipy.sparse.linalg import eigsh

        params = [p for p in model.parameters() if p.requires_grad]
        op = GGNLinearOperator(
            model, loss, params, [(X, y)], check_deterministic=False
        ).to_scipy()
        evals, _ = eigsh(op, k=k, which="LA")
        return np.sort(evals)[::-1].tolist(), {}
    op = ggn_linear_operator(model, loss, X, y)
    evals, products = power_iteration(op, k, s["power_tol"], s["power_max_iter"])
    return evals.tolist(), {"products": products}


def compute(s: dict) -> dict:
    N, kmax = s["batch_size"], max(s["k_peers"] + s["k_lanczos"])
    grids = {
        "dense": [kmax],
        "lanczos": s["k_lanczos"],
        "curvlinops": s["k_peers"],
        "power": s["k_peers"],
    }
    skipped, records = {}, []
    if not installed("curvlinops"):
        skipped["curvlinops"] = "curvlinops-for-pytorch is not installed"
    for bn in (False, True):
        label = s["model"] + ("-bn (train mode)" if bn else "")
        reference = None
        for method in METHODS:
            if method in skipped:
                continue
            running = method != "curvlinops"  # torch.func refuses buffer updates
            model, X, y = build(s["model"], bn, N, SEED, running)
            warm = build(s["model"], bn, 4, SEED + 1, running)
            method_call(method, *warm, k=1, s=s)  # first-call overheads
            for k in grids[method]:
                (evals, info), sec = timed(method_call, method, model, X, y, k, s)
                if method == "dense":
                    reference = evals
                dev = max(abs(a - b) for a, b in zip(evals, reference)) / reference[0]
                records.append(
                    {
                        "model": label,
                        "batch_norm": bn,
                        "method": method,
                        "k": k,
                        "seconds": sec,
                        "eigenvalues": evals,
                        "max_rel_dev_from_dense": dev,
                        **info,
                    }
                )
                print(f"{label} {method} k={k}: {sec:.1f} s, dev {dev:.1e}", flush=True)
                cap = s["cap_lanczos_s"] if method == "lanczos" else s["cap_s"]
                if sec > cap and k != grids[method][-1]:
                    records.append(
                        {
                            "model": label,
                            "batch_norm": bn,
                            "method": method,
                            "skipped_k": [j for j in grids[method] if j > k],
                            "reason": f"a call took {sec:.0f} s > cap {cap:.0f} s",
                        }
                    )
                    break
    return {
        "num_params": sum(
            p.numel() for p in build(s["model"], False, 2, 0)[0].parameters()
        ),
        "num_params_bn": sum(
            p.numel() for p in build(s["model"], True, 2, 0)[0].parameters()
        ),
        "skipped": skipped,
        "records": records,
    }


if __name__ == "__main__":
    run_main(__doc__, HERE, compute, FULL, QUICK, SEED)
