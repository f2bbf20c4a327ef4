"""SGD, Adam and damped Newton in the top-10 GGN eigenspace on the digits, seeded.

The zoo's ``cnn`` and ``cnn-bn`` (BatchNorm in train mode; D = 1,898 and 1,946),
float32, cross-entropy, trained from the same initialisation on the same seeded
mini-batches of a fixed 80 % training split of the 1,797 digits (the other 20 % are
the test set) with

* SGD (momentum 0.9) and Adam;
* :class:`lowrank_ggn.optim.DampedNewton` (``top_k`` directions, ``lr = 1``, a
  gradient step of ``complement_lr`` in the complement, ``update_buffers=True`` so
  that BatchNorm's running statistics follow training) with constant damping and
  with ViViT's bootstrap damping (:class:`lowrank_ggn.optim.BootstrapDamping`:
  grid ``logspace(-4, 2, 200)``, 100 resamples, the 5 % quantile of the gain).

Recorded per step: the mini-batch loss before the step and the cumulative wall time
of the optimiser steps alone (evaluation excluded; one untimed warm-up step on a
throwaway copy of the model comes first, for every optimiser); for damped Newton the
dampings (``null`` for ``inf``), the directions stepped along, ``λ_1`` and the step
norm (5 significant digits). Every ``eval_every``
steps: loss and accuracy on the whole training split and on the test split, in eval
mode (BatchNorm with its running statistics). The hyperparameters come from a short
pilot on ``cnn`` (100 steps), not from a search.

    python experiments/optimizers/run.py [--quick] [--out PATH]
"""

from __future__ import annotations

import copy
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/_common.py

from _common import run_main  # noqa: E402

from lowrank_ggn import SampleMixingWarning  # noqa: E402
from lowrank_ggn.app.data import load_digits  # noqa: E402
from lowrank_ggn.app.models import build_model, num_params  # noqa: E402
from lowrank_ggn.optim import (  # noqa: E402
    BootstrapDamping,
    ConstantDamping,
    DampedNewton,
)

SEED = 0
FULL = {
    "steps": 300,
    "batch_size": 64,
    "eval_every": 10,
    "top_k": 10,
    "sgd_lr": 0.05,
    "momentum": 0.9,
    "adam_lr": 1e-2,
    "constant_damping": 1.0,
    "complement_lr": 0.3,
    "resamples": 100,
    "quantile": 0.05,
    "test_fraction": 0.2,
}
QUICK = {
    **FULL,
    "steps": 3,
    "batch_size": 16,
    "eval_every": 1,
    "top_k": 3,
    "resamples": 20,
}
MODELS = [("cnn", "cnn"), ("cnn-bn (train mode)", "cnn-bn")]
OPTIMIZERS = ("SGD", "Adam", "DampedNewton, constant", "DampedNewton, bootstrap")


def split(s: dict, dtype: torch.dtype):
    """Seeded train/test split of the digits: ``(X_tr, y_tr), (X_te, y_te)``."""
    images, labels = load_digits(dtype)
    perm = torch.randperm(
        images.shape[0], generator=torch.Generator().manual_seed(SEED)
    )
    n_test = round(s["test_fraction"] * images.shape[0])
    test, train = perm[:n_test], perm[n_test:]
    return (images[train], labels[train]), (images[test], labels[test])


def batches(train, batch_size: int, seed: int):
    """Reshuffled epochs of the training split (the last incomplete batch dropped)."""
    X, y = train
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(X.shape[0], generator=gen)
        for start in range(0, X.shape[0] - batch_size + 1, batch_size):
            idx = perm[start : start + batch_size]
            yield X[idx], y[idx]


def evaluate(model: nn.Module, data) -> tuple[float, float]:
    """Loss and accuracy on ``data`` in eval mode (the model's modes restored)."""
    modes = [m.training for m in model.modules()]
    model.eval()
    with torch.no_grad():
        out = model(data[0])
        loss = float(nn.functional.cross_entropy(out, data[1]))
        accuracy = float((out.argmax(1) == data[1]).double().mean())
    for m, mode in zip(model.modules(), modes):
        m.training = mode
    return loss, accuracy


def make_optimizer(name: str, model: nn.Module, s: dict):
    loss = nn.CrossEntropyLoss()
    if name == "SGD":
        return torch.optim.SGD(
            model.parameters(), lr=s["sgd_lr"], momentum=s["momentum"]
        )
    if name == "Adam":
        return torch.optim.Adam(model.parameters(), lr=s["adam_lr"])
    if name.endswith("constant"):
        policy = ConstantDamping(s["constant_damping"])
    else:
        policy = BootstrapDamping(
            resamples=s["resamples"],
            quantile=s["quantile"],
            generator=torch.Generator().manual_seed(SEED),
        )
    return DampedNewton(
        model.parameters(),
        model=model,
        loss_func=loss,
        top_k=s["top_k"],
        damping=policy,
        complement_lr=s["complement_lr"],
        update_buffers=True,
    )


def _g(x: float) -> float:
    return float(f"{x:.5g}")


def one_step(opt, model: nn.Module, X, y) -> dict:
    """One optimiser step on ``(X, y)``; what it reports."""
    if isinstance(opt, DampedNewton):
        info = opt.step(X, y)
        lam = info.eigenvalues
        return {
            "loss": info.loss,
            "damping": [
                _g(d) if d != float("inf") else None for d in info.damping.tolist()
            ],
            "num_directions": info.num_directions,
            "lambda_1": _g(lam[0].item()) if lam.numel() else None,
            "step_norm": _g(info.step_norm),
        }
    opt.zero_grad(set_to_none=True)
    value = nn.functional.cross_entropy(model(X), y)
    value.backward()
    opt.step()
    return {"loss": value.item()}


def train(model_name: str, opt_name: str, s: dict, train_data, test_data) -> dict:
    model = build_model(model_name, SEED, torch.float32)
    warm = copy.deepcopy(model)  # first-call overheads outside the timed run
    X, y = next(batches(train_data, s["batch_size"], SEED + 2))
    one_step(make_optimizer(opt_name, warm, s), warm, X, y)
    opt = make_optimizer(opt_name, model, s)
    data = batches(train_data, s["batch_size"], SEED + 1)
    steps, evals = [], []
    elapsed = 0.0

    def checkpoint(step: int) -> None:
        tr_loss, tr_acc = evaluate(model, train_data)
        te_loss, te_acc = evaluate(model, test_data)
        evals.append(
            {
                "step": step,
                "seconds": elapsed,
                "train_loss": tr_loss,
                "train_accuracy": tr_acc,
                "test_loss": te_loss,
                "test_accuracy": te_acc,
            }
        )

    checkpoint(0)
    for step in range(1, s["steps"] + 1):
        X, y = next(data)
        t0 = time.perf_counter()
        record = one_step(opt, model, X, y)
        elapsed += time.perf_counter() - t0
        steps.append({"step": step, "seconds": elapsed, **record})
        if step % s["eval_every"] == 0 or step == s["steps"]:
            checkpoint(step)
    last = evals[-1]
    print(
        f"{model_name:7s} {opt_name:24s} train loss {last['train_loss']:.4f} "
        f"test acc {last['test_accuracy']:.3f} {elapsed:.1f} s",
        flush=True,
    )
    return {"optimizer": opt_name, "steps": steps, "evals": evals}


def compute(s: dict) -> dict:
    torch.manual_seed(SEED)
    train_data, test_data = split(s, torch.float32)
    runs = []
    with warnings.catch_warnings():
        # bootstrap on train-mode BatchNorm: per-component resampling (documented)
        warnings.simplefilter("ignore", SampleMixingWarning)
        for label, name in MODELS:
            model = build_model(name, SEED, torch.float32)
            runs.append(
                {
                    "label": label,
                    "model": name,
                    "num_params": num_params(model),
                    "optimizers": [
                        train(name, opt, s, train_data, test_data) for opt in OPTIMIZERS
                    ],
                }
            )
    return {
        "loss": "CrossEntropyLoss(mean)",
        "dtype": "float32",
        "num_train": int(train_data[0].shape[0]),
        "num_test": int(test_data[0].shape[0]),
        "runs": runs,
    }


if __name__ == "__main__":
    run_main(__doc__, HERE, compute, FULL, QUICK, SEED)
