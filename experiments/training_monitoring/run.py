"""Curvature monitoring during seeded SGD on the digits, with and without BatchNorm.

ViViT's Figure 3 (Dangel, Tatzel & Hennig, TMLR 2022, https://arxiv.org/abs/2106.02624)
on the zoo's ``cnn`` and ``cnn-bn`` (BatchNorm in train mode), float64, cross-entropy,
``C = 10`` classes. Both train with SGD (seeded batches of ``train_batch``), and at
each checkpoint, on a fixed monitoring mini-batch of ``N`` digits:

* **mini-batch vs full data**: the overlap of the mini-batch GGN's top-C eigenspace
  (:func:`lowrank_ggn.ggn_spectrum`) with that of the GGN of all 1,797 digits
  (:func:`lowrank_ggn.ggn_spectrum_dataset`, batches of ``N``, Lanczos; with
  BatchNorm each batch has its own statistics, as in training);
* **GGN vs Hessian**: the overlap of the mini-batch GGN's top-C eigenspace with the
  top-C eigenspace (largest algebraic eigenvalues) of the mini-batch loss Hessian,
  from ``torch.func`` Hessian-vector products and
  :func:`lowrank_ggn.core.lanczos.top_eigenpairs`;
* **SNRs**: ``mean² / variance`` over the batch of the first- and second-order
  directional derivatives ``γ_nk``, ``λ_nk`` along the top-C GGN eigenvectors
  (:func:`lowrank_ggn.directional_derivatives`; per-component with train-mode
  BatchNorm).

Overlap of two ``C``-dimensional subspaces: ``‖P_A P_B‖_F² / C`` ∈ [0, 1]; ``C / D``
for random subspaces.

    python experiments/training_monitoring/run.py [--quick] [--out PATH]
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/_common.py

from _common import (  # noqa: E402
    digits_sgd_runs,
    run_main,
    subspace_overlap,
    timed,
    without_running_stats,
)

from lowrank_ggn import (  # noqa: E402
    SampleMixingWarning,
    directional_derivatives,
    ggn_spectrum,
    ggn_spectrum_dataset,
)
from lowrank_ggn.app.data import digits_batch, load_digits  # noqa: E402
from lowrank_ggn.core.lanczos import top_eigenpairs  # noqa: E402

SEED = 0
FULL = {
    "checkpoints": [0, 20, 100, 400],
    "batch_size": 128,
    "train_batch": 64,
    "lr": 0.05,
    "momentum": 0.9,
    "top_c": 10,
    "full_data": 1797,
}
QUICK = {
    "checkpoints": [0, 1],
    "batch_size": 8,
    "train_batch": 8,
    "lr": 0.05,
    "momentum": 0.9,
    "top_c": 2,
    "full_data": 24,
}
MODELS = [("cnn", "cnn"), ("cnn-bn (train mode)", "cnn-bn")]


def hessian_top(model: nn.Module, X, y, k: int):
    """Top-k (largest algebraic) eigenpairs of the batch-loss Hessian, ``[k]``, ``[D, k]``.

    Hessian-vector products ``∇²L v`` by forward-over-reverse ``torch.func``; the
    BatchNorm copy tracks no running statistics (same train-mode function, no
    in-place buffer updates under the transforms).
    """
    net = without_running_stats(model)
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in net.named_parameters() if p.requires_grad]
    flat = torch.cat(
        [p.detach().reshape(-1) for p in net.parameters() if p.requires_grad]
    )
    loss = nn.CrossEntropyLoss()

    def unflatten(v):
        parts = torch.split(v, [s.numel() for s in shapes])
        return {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}

    def f(v):
        return loss(functional_call(net, unflatten(v), (X,)), y)

    def hvp(v):  # ∇²L v = d/dε ∇L(θ + ε v)
        return jvp(grad(f), (flat,), (v,))[1]

    def matmat(V):  # [D, b] -> [D, b]
        return vmap(hvp, in_dims=1, out_dims=1)(V)

    evals, evecs, info = top_eigenpairs(
        matmat,
        flat.numel(),
        k,
        dtype=flat.dtype,
        generator=torch.Generator().manual_seed(SEED),
    )
    return evals, evecs, info


def monitor(model, X, y, data, s: dict) -> dict:
    C, loss = s["top_c"], nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleMixingWarning)  # per-component: known
        mini = ggn_spectrum(
            model, loss, X, y, top_k=C, eigenvectors=True, progress=False
        )
        batches = [
            (data[0][i : i + s["batch_size"]], data[1][i : i + s["batch_size"]])
            for i in range(0, data[0].shape[0], s["batch_size"])
        ]
        batches = [b for b in batches if b[0].shape[0] >= 2]
        full = ggn_spectrum_dataset(
            model,
            loss,
            batches,
            top_k=C,
            eigenvectors=True,
            solver="lanczos",
            progress=False,
        )
        h_evals, h_evecs, h_info = hessian_top(model, X, y, C)
        dd = directional_derivatives(model, loss, X, y, mini)
    with torch.no_grad():
        model.eval()
        accuracy = float((model(data[0]).argmax(1) == data[1]).double().mean())
        model.train()
    return {
        "ggn_top": mini.eigenvalues.tolist(),
        "ggn_full_top": full.eigenvalues.tolist(),
        "hessian_top": h_evals.tolist(),
        "hessian_lanczos_converged": bool(h_info.converged),
        "overlap_mini_full": subspace_overlap(mini.eigenvectors, full.eigenvectors),
        "overlap_ggn_hessian": subspace_overlap(mini.eigenvectors, h_evecs.T),
        "gamma_snr": dd.gamma_snr.tolist(),
        "lambda_snr": dd.lambda_snr.tolist(),
        "curvatures_match_eigenvalues": float(
            ((dd.curvatures - mini.eigenvalues).abs() / mini.eigenvalues[0]).max()
        ),
        "full_data_accuracy_eval_mode": accuracy,
    }


def compute(s: dict) -> dict:
    X, y = digits_batch(s["batch_size"], SEED + 1, torch.float64)  # monitoring batch
    images, labels = load_digits(torch.float64)
    data = (images[: s["full_data"]], labels[: s["full_data"]])

    def record(model: nn.Module, label: str, step: int) -> dict:
        out, sec = timed(monitor, model, X, y, data, s)
        print(
            label,
            step,
            f"{out['overlap_mini_full']:.2f}",
            f"{out['overlap_ggn_hessian']:.2f}",
            f"{sec:.1f} s",
            flush=True,
        )
        return {"seconds": sec, **out}

    return digits_sgd_runs(s, SEED, MODELS, record)


if __name__ == "__main__":
    run_main(__doc__, HERE, compute, FULL, QUICK, SEED)
