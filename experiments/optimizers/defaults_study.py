"""Which defaults of DampedNewton train: a small study against tuned SGD (issue 26).

On the problems of :mod:`problems` (float32, batches of 64, the same seeded batches
and initialisations for every optimiser, ``seeds`` seeds), each optimiser trains for
``steps`` steps and is scored by the final training loss (the whole training split,
in training modes), averaged over the seeds:

* SGD with momentum 0.9 over the learning-rate grid ``sgd_lrs``; "tuned SGD" is the
  grid's best mean final loss;
* ``DampedNewton`` (top-10, ``lr = 1``) over the settings ``newton`` of
  ``complement_lr``, complement ``momentum`` and constant ``damping``, each row with
  all three explicit.

The defaults of :class:`~lowrank_ggn.optim.DampedNewton` were chosen from these rows;
:func:`summary` marks the row that equals them and its ratio to tuned SGD (the bar of
issue 26: within 10 % on ``teacher-student`` and ``synthetic-bn-cnn``). Writes
``defaults.json`` next to this script; ``--summary`` only recomputes the summary of
the existing JSON (no training) after the defaults changed; ``--redo PROBLEM`` trains
that problem's rows again with today's settings and replaces them in the JSON.

    python experiments/optimizers/defaults_study.py [--quick] [--out PATH] [--summary]
        [--redo PROBLEM]
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/_common.py
sys.path.insert(0, str(HERE))  # problems.py

from _common import run_main  # noqa: E402
from problems import PROBLEMS, batches, evaluate  # noqa: E402

from lowrank_ggn.app.models import num_params  # noqa: E402
from lowrank_ggn.optim import DampedNewton, TopKWarning  # noqa: E402
from lowrank_ggn.optim.damped_newton import (  # noqa: E402
    DEFAULT_COMPLEMENT_LR,
    DEFAULT_DAMPING,
    DEFAULT_MOMENTUM,
    DEFAULT_TOP_K,
)

SEED = 0
FULL = {
    "steps": 100,
    "batch_size": 64,
    "seeds": 3,
    "problems": ["teacher-student", "synthetic-bn-cnn", "digits-cnn-bn"],
    "seeds_digits": 1,
    "sgd_lrs": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
    "momentum": 0.9,
    # (complement_lr, momentum, damping)
    "newton": [
        [0.0, 0.0, 1.0],
        [0.1, 0.0, 1.0],
        [0.3, 0.0, 1.0],
        [1.0, 0.0, 1.0],
        [3.0, 0.0, 1.0],
        [0.1, 0.9, 1.0],
        [0.3, 0.9, 1.0],
        [1.0, 0.0, 0.1],
        [1.0, 0.0, 10.0],
    ],
    "newton_digits": [[0.0, 0.0, 1.0], [0.1, 0.9, 1.0], [1.0, 0.0, 1.0]],
    "tolerance": 0.10,
}
QUICK = {
    **FULL,
    "steps": 3,
    "seeds": 1,
    "problems": ["teacher-student", "synthetic-bn-cnn"],
    "sgd_lrs": [0.1, 1.0],
    "newton": [[0.0, 0.0, 1.0], [1.0, 0.0, 1.0]],
}
BAR_PROBLEMS = ("teacher-student", "synthetic-bn-cnn")


def _train(problem, make_opt, s: dict, seed: int) -> dict:
    model = problem.build(seed)
    opt = make_opt(model)
    data = batches(problem.train, s["batch_size"], seed + 100)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TopKWarning)  # diverging runs lose rank
        for _ in range(s["steps"]):
            X, y = next(data)
            if isinstance(opt, DampedNewton):
                try:
                    opt.step(X, y)
                except ValueError:  # the parameters diverged to NaN/inf
                    return {"seed": seed, "train_loss": math.inf, "diverged": True}
            else:
                opt.zero_grad(set_to_none=True)
                problem.loss_func(model(X), y).backward()
                opt.step()
    seconds = time.perf_counter() - t0
    final = evaluate(problem, model, "train")
    loss = final["loss"] if math.isfinite(final["loss"]) else math.inf
    return {"seed": seed, "train_loss": loss, "seconds": seconds}


def _mean(runs: list[dict]) -> float:
    values = [r["train_loss"] for r in runs]
    return sum(values) / len(values) if all(map(math.isfinite, values)) else math.inf


def study(name: str, s: dict) -> dict:
    problem = PROBLEMS[name]()
    digits = name not in BAR_PROBLEMS
    seeds = range(s["seeds_digits"] if digits else s["seeds"])
    configs = [("SGD", {"lr": lr}) for lr in s["sgd_lrs"]]
    configs += [
        ("DampedNewton", {"complement_lr": c, "momentum": m, "damping": d})
        for c, m, d in s["newton_digits" if digits else "newton"]
    ]
    rows = []
    for opt_name, kwargs in configs:

        def make(model, opt_name=opt_name, kwargs=kwargs):
            if opt_name == "SGD":
                return torch.optim.SGD(
                    model.parameters(), momentum=s["momentum"], **kwargs
                )
            return DampedNewton(
                model.parameters(), model=model, loss_func=problem.loss_func, **kwargs
            )

        runs = [_train(problem, make, s, seed) for seed in seeds]
        rows.append(
            {
                "optimizer": opt_name,
                "settings": kwargs,
                "runs": runs,
                "mean_train_loss": _mean(runs),
            }
        )
        print(f"{name:17s} {opt_name:13s} {kwargs} {rows[-1]['mean_train_loss']:.4g}")
    return {
        "problem": name,
        "label": problem.label,
        "num_params": num_params(problem.build(0)),
        "seeds": len(seeds),
        "rows": rows,
    }


def summary(result: dict) -> dict:
    """Mark the rows of the current defaults; their ratio to tuned SGD, per problem."""
    defaults = {
        "complement_lr": DEFAULT_COMPLEMENT_LR,
        "momentum": DEFAULT_MOMENTUM,
        "damping": DEFAULT_DAMPING,
    }
    result["defaults"] = {"top_k": DEFAULT_TOP_K, "lr": 1.0, **defaults}
    tolerance = result["settings"]["tolerance"]
    for prob in result["problems"]:
        rows = prob["rows"]
        sgd = [r for r in rows if r["optimizer"] == "SGD"]
        tuned = min(sgd, key=lambda r: r["mean_train_loss"])
        prob["tuned_sgd_lr"] = tuned["settings"]["lr"]
        prob["tuned_sgd_loss"] = tuned["mean_train_loss"]
        newton = [r for r in rows if r["optimizer"] == "DampedNewton"]
        prob["best_newton"] = min(newton, key=lambda r: r["mean_train_loss"])[
            "settings"
        ]
        default = [r for r in newton if r["settings"] == defaults]
        for r in newton:
            r["is_default"] = r["settings"] == defaults
        if default:
            ratio = default[0]["mean_train_loss"] / tuned["mean_train_loss"]
            prob["default_loss"] = default[0]["mean_train_loss"]
            prob["default_over_tuned_sgd"] = ratio
            prob["within_bar"] = bool(ratio <= 1 + tolerance)
    return result


def compute(s: dict) -> dict:
    return {
        "dtype": "float32",
        "problems": [study(name, s) for name in s["problems"]],
    }


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    path = HERE / ("defaults_quick.json" if quick else "defaults.json")
    if "--summary" in argv:  # the defaults changed: re-mark the rows, no training
        path.write_text(json.dumps(summary(json.loads(path.read_text())), indent=1))
        return
    if "--redo" in argv:  # one problem's rows again, with today's settings
        name = argv[argv.index("--redo") + 1]
        result = json.loads(path.read_text())
        settings = {**(QUICK if quick else FULL), "quick": quick, "seed": SEED}
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        redone = study(name, settings)
        result["problems"] = [
            redone if prob["problem"] == name else prob for prob in result["problems"]
        ]
        result["settings"] = settings
        result["seconds_total"] += time.perf_counter() - t0
        path.write_text(json.dumps(summary(result), indent=1))
        return
    if "--out" not in argv:
        argv = [
            *argv,
            "--out",
            str(HERE / ("defaults_quick.json" if quick else "defaults.json")),
        ]
    result = run_main(__doc__, HERE, compute, FULL, QUICK, SEED, argv=argv)
    out = Path(argv[argv.index("--out") + 1])
    out.write_text(json.dumps(summary(result), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
