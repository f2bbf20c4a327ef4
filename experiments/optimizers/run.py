"""SGD, Adam and damped Newton on two problems, tuned alike, over several seeds.

Problems (:mod:`problems`, float32): the zoo's ``cnn-bn`` on the digits (BatchNorm in
train mode, D = 1,946, cross-entropy) and the teacher-student MLP regression
(D = 5,508, MSE). Optimisers:

* SGD (momentum 0.9) and Adam;
* :class:`lowrank_ggn.optim.DampedNewton` at its defaults (top-10, ``lr = 1``,
  constant damping ``δ = 1``, complement momentum 0.9) with ``update_buffers=True`` (BatchNorm's running
  statistics follow training), and with ViViT's bootstrap damping
  (:class:`lowrank_ggn.optim.BootstrapDamping`: grid ``logspace(-4, 2, 200)``, 100
  resamples, the 5 % quantile of the gain).

**The same tuning budget for every optimiser**: one learning rate per optimiser (SGD's
and Adam's ``lr``, damped Newton's ``complement_lr``) is chosen from a grid of four
values (×3 apart) by the training loss after ``pilot_steps`` steps of seed 0; the
chosen value then trains ``seeds`` seeds (initialisation and batch order) for
``steps`` steps. Every optimiser sees the same initialisations and batches.

Recorded per step: the mini-batch loss before the step and the cumulative wall time
of the optimiser steps alone (evaluation excluded; one untimed warm-up step on a
throwaway copy of the model comes first); for damped Newton the dampings (``null``
for ``inf``), the directions stepped along, ``λ_1`` and the step norm (5 significant
digits). Every ``eval_every`` steps: loss (and error rate) on the whole training and
test splits, in eval mode (BatchNorm with its running statistics).

    python experiments/optimizers/run.py [--quick] [--out PATH]
"""

from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/_common.py
sys.path.insert(0, str(HERE))  # problems.py

from _common import run_main  # noqa: E402
from problems import PROBLEMS, Problem, batches  # noqa: E402

from lowrank_ggn import SampleMixingWarning  # noqa: E402
from lowrank_ggn.app.models import num_params  # noqa: E402
from lowrank_ggn.optim import BootstrapDamping, DampedNewton  # noqa: E402

SEED = 0
FULL = {
    "problems": ["digits-cnn-bn", "teacher-student"],
    "steps": 120,
    "pilot_steps": 40,
    "seeds": 3,
    "batch_size": 64,
    "eval_every": 10,
    "momentum": 0.9,
    "grids": {
        "SGD": [0.01, 0.03, 0.1, 0.3],
        "Adam": [0.001, 0.003, 0.01, 0.03],
        "DampedNewton, constant": [0.01, 0.03, 0.1, 0.3],
        "DampedNewton, bootstrap": [0.01, 0.03, 0.1, 0.3],
    },
    "resamples": 100,
    "quantile": 0.05,
}
QUICK = {
    **FULL,
    "steps": 3,
    "pilot_steps": 2,
    "seeds": 2,
    "batch_size": 16,
    "eval_every": 1,
    "grids": {name: grid[1:3] for name, grid in FULL["grids"].items()},
    "resamples": 20,
}
OPTIMIZERS = tuple(FULL["grids"])


def make_optimizer(name: str, model: nn.Module, problem: Problem, lr: float, s: dict):
    """The optimiser ``name`` with its tuned learning rate ``lr``."""
    if name == "SGD":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=s["momentum"])
    if name == "Adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    options = {"complement_lr": lr, "update_buffers": True}
    if name.endswith("bootstrap"):
        options["damping"] = BootstrapDamping(
            resamples=s["resamples"],
            quantile=s["quantile"],
            generator=torch.Generator().manual_seed(SEED),
        )
    return DampedNewton(
        model.parameters(), model=model, loss_func=problem.loss_func, **options
    )


def evaluate(problem: Problem, model: nn.Module, split: str) -> dict:
    """Loss (and error rate) of a split in eval mode (the model's modes restored)."""
    X, y = getattr(problem, split)
    modes = [m.training for m in model.modules()]
    model.eval()
    with torch.no_grad():
        out = model(X)
        result = {"loss": float(problem.loss_func(out, y))}
        if problem.classification:
            result["error"] = float((out.argmax(1) != y).double().mean())
    for m, mode in zip(model.modules(), modes):
        m.training = mode
    return result


def _g(x: float) -> float:
    return float(f"{x:.5g}")


def one_step(opt, model: nn.Module, problem: Problem, X, y) -> dict:
    """One optimiser step on ``(X, y)``; what it reports."""
    if isinstance(opt, DampedNewton):
        info = opt.step(X, y)
        lam = info.eigenvalues
        return {
            "loss": info.loss,
            "damping": [
                _g(d) if math.isfinite(d) else None for d in info.damping.tolist()
            ],
            "num_directions": info.num_directions,
            "lambda_1": _g(lam[0].item()) if lam.numel() else None,
            "step_norm": _g(info.step_norm),
        }
    opt.zero_grad(set_to_none=True)
    value = problem.loss_func(model(X), y)
    value.backward()
    opt.step()
    return {"loss": value.item()}


def train(problem: Problem, name: str, lr: float, seed: int, steps: int, s: dict):
    """``steps`` steps from initialisation ``seed``; per-step records and evals."""
    model = problem.build(seed)
    warm = copy.deepcopy(model)  # first-call overheads outside the timed run
    X, y = next(batches(problem.train, s["batch_size"], seed + 1000))
    one_step(make_optimizer(name, warm, problem, lr, s), warm, problem, X, y)
    opt = make_optimizer(name, model, problem, lr, s)
    data = batches(problem.train, s["batch_size"], seed + 100)
    records, evals, elapsed = [], [], 0.0

    def checkpoint(step: int) -> None:
        train_eval = evaluate(problem, model, "train")
        test_eval = evaluate(problem, model, "test")
        evals.append(
            {
                "step": step,
                "seconds": elapsed,
                **{f"train_{k}": v for k, v in train_eval.items()},
                **{f"test_{k}": v for k, v in test_eval.items()},
            }
        )

    checkpoint(0)
    for step in range(1, steps + 1):
        X, y = next(data)
        t0 = time.perf_counter()
        try:
            record = one_step(opt, model, problem, X, y)
        except ValueError:  # diverged: parameters NaN/inf, the GGN undefined
            evals.append({"step": step, "seconds": elapsed, "train_loss": math.inf})
            break
        elapsed += time.perf_counter() - t0
        records.append({"step": step, "seconds": elapsed, **record})
        if step % s["eval_every"] == 0 or step == steps:
            checkpoint(step)
    return {"seed": seed, "steps": records, "evals": evals}


def tune(problem: Problem, name: str, s: dict) -> tuple[float, list[dict]]:
    """The grid value with the lowest training loss after the pilot; every pilot."""
    pilots = []
    for lr in s["grids"][name]:
        run = train(problem, name, lr, SEED, s["pilot_steps"], s)
        loss = run["evals"][-1]["train_loss"]
        pilots.append({"lr": lr, "train_loss": loss if math.isfinite(loss) else None})
    finite = [p for p in pilots if p["train_loss"] is not None]
    best = min(finite, key=lambda p: p["train_loss"])["lr"]
    return best, pilots


def compute(s: dict) -> dict:
    torch.manual_seed(SEED)
    out = []
    with warnings.catch_warnings():
        # bootstrap on train-mode BatchNorm: per-component resampling (documented)
        warnings.simplefilter("ignore", SampleMixingWarning)
        for pname in s["problems"]:
            problem = PROBLEMS[pname]()
            optimizers = []
            for name in OPTIMIZERS:
                lr, pilots = tune(problem, name, s)
                runs = [
                    train(problem, name, lr, SEED + i, s["steps"], s)
                    for i in range(s["seeds"])
                ]
                last = [r["evals"][-1]["train_loss"] for r in runs]
                print(
                    f"{pname:16s} {name:24s} lr {lr:g}: final train loss "
                    + ", ".join(f"{v:.4g}" for v in last)
                    + f"; {sum(r['steps'][-1]['seconds'] for r in runs):.1f} s",
                    flush=True,
                )
                optimizers.append(
                    {"optimizer": name, "lr": lr, "pilots": pilots, "runs": runs}
                )
            out.append(
                {
                    "problem": pname,
                    "label": problem.label,
                    "classification": problem.classification,
                    "loss": type(problem.loss_func).__name__,
                    "num_params": num_params(problem.build(SEED)),
                    "num_train": int(problem.train[0].shape[0]),
                    "num_test": int(problem.test[0].shape[0]),
                    "optimizers": optimizers,
                }
            )
    return {"dtype": "float32", "problems": out}


if __name__ == "__main__":
    run_main(__doc__, HERE, compute, FULL, QUICK, SEED)
