r"""Per-layer GGN diagonal through training, with and without BatchNorm (train mode).

The exact GGN diagonal ``diag(G) = Σ_{n,c} (J_nᵀ s_nc)²`` (:func:`lowrank_ggn.ggn_diagonal`;
BatchNorm in train mode through the same decomposition as the Gram matrix) of the
zoo's ``cnn`` and ``cnn-bn`` on a fixed monitoring batch of ``N`` digits, float64,
cross-entropy, ``C = 10``, at checkpoints of seeded SGD (``train_batch`` per step).
At each checkpoint, per layer (the parameters of one module):

* ``mean_diag``: the mean diagonal entry ``tr(G_ll) / D_l``, the per-parameter
  curvature that diagonal Laplace approximations and pruning saliencies use;
* ``trace_share``: ``tr(G_ll) / tr(G)``;
* ``mc_rel_error``: the relative error of the Monte-Carlo estimate with one sampled
  factor column per sample (``mc_samples=1``) of ``tr(G_ll)``;
* ``quantiles``: the 10/50/90 % quantiles of the layer's diagonal entries.

Also per checkpoint: ``tr G`` and the check ``|tr G − Σ λ| / tr G`` against the
sum of the exact spectrum's eigenvalues (:func:`lowrank_ggn.ggn_spectrum`).
The diagonal, not the spectrum, is the cheap quantity here: both times are recorded.

    python experiments/ggn_diagonal/run.py [--quick] [--out PATH]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/_common.py

from _common import digits_sgd_runs, run_main, timed  # noqa: E402

from lowrank_ggn import ggn_diagonal, ggn_spectrum  # noqa: E402
from lowrank_ggn.app.data import digits_batch  # noqa: E402
from lowrank_ggn.app.models import build_model  # noqa: E402

SEED = 0
FULL = {
    "checkpoints": [0, 10, 30, 100, 300, 1000],
    "batch_size": 128,
    "train_batch": 64,
    "lr": 0.05,
    "momentum": 0.9,
    "mc_seed": 1,
}
QUICK = {**FULL, "checkpoints": [0, 2], "batch_size": 8, "train_batch": 8}
MODELS = [("cnn", "cnn"), ("cnn-bn (train mode)", "cnn-bn")]


def layers(model: nn.Module) -> list[tuple[str, str, list[int]]]:
    """``(module name, kind, indices into model.parameters())`` per module with
    parameters; ``kind`` is the class and its ordinal (``"Conv2d 2"``), which lines
    up the layers of the models with and without BatchNorm."""
    index = {id(p): i for i, p in enumerate(model.parameters())}
    counts: dict[str, int] = {}
    out = []
    for name, module in model.named_modules():
        own = [index[id(p)] for p in module.parameters(recurse=False)]
        if own:
            kind = type(module).__name__
            counts[kind] = counts.get(kind, 0) + 1
            out.append((name or "<root>", f"{kind} {counts[kind]}", own))
    return out


def monitor(model: nn.Module, X, y) -> dict:
    loss = nn.CrossEntropyLoss()
    exact, t_diag = timed(ggn_diagonal, model, loss, X, y)
    gen = torch.Generator().manual_seed(SEED + 1)
    mc = ggn_diagonal(model, loss, X, y, mc_samples=1, generator=gen)
    spec, t_spec = timed(ggn_spectrum, model, loss, X, y)
    trace = float(exact.trace)
    per_layer = []
    for name, kind, idx in layers(model):
        d = torch.cat([exact.per_param[i].reshape(-1) for i in idx])
        d_mc = torch.cat([mc.per_param[i].reshape(-1) for i in idx])
        q = torch.quantile(d, torch.tensor([0.1, 0.5, 0.9], dtype=d.dtype))
        per_layer.append(
            {
                "layer": name,
                "kind": kind,
                "D": d.numel(),
                "mean_diag": float(d.mean()),
                "trace_share": float(d.sum()) / trace,
                "mc_rel_error": float((d_mc.sum() - d.sum()).abs() / d.sum()),
                "quantiles": [float(v) for v in q],
            }
        )
    return {
        "trace": trace,
        "trace_vs_eigenvalues": abs(trace - float(spec.eigenvalues.sum())) / trace,
        "route": str(exact.route.value),
        "seconds_diagonal": t_diag,
        "seconds_spectrum": t_spec,
        "layers": per_layer,
    }


def compute(s: dict) -> dict:
    X, y = digits_batch(s["batch_size"], SEED + 1, torch.float64)  # monitoring batch
    monitor(build_model("cnn", SEED, torch.float64), X, y)  # warm-up: first-call costs

    def record(model: nn.Module, label: str, step: int) -> dict:
        out = monitor(model, X, y)
        print(
            label,
            step,
            f"tr G {out['trace']:.3g}",
            f"diag {out['seconds_diagonal']:.2f} s",
            f"spectrum {out['seconds_spectrum']:.2f} s",
            flush=True,
        )
        return out

    return digits_sgd_runs(s, SEED, MODELS, record)


if __name__ == "__main__":
    run_main(__doc__, HERE, compute, FULL, QUICK, SEED)
