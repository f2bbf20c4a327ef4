"""Plot ``results.json`` of ``run.py``: SGD, Adam and damped Newton on the digits.

Reads only the JSON; writes ``figures/optimizers.png|pdf`` at the repository root
(``…_quick`` for a quick run). One row per model (``cnn``, ``cnn-bn`` in train mode):
loss on the training split and accuracy on the test split (eval mode) against the
step and against the wall time of the optimiser steps. Last row: the dampings damped
Newton used per step (every finite ``δ_k`` as a dot, ``inf`` ones skipped; the line
is the median over a trailing window of steps) and the number of directions it stepped
along (faint: per step; line: the window's mean).

    python experiments/optimizers/plot.py [--quick] [--json PATH] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/_common.py

from _common import plot_main  # noqa: E402

from lowrank_ggn.app import plotting  # noqa: E402

SMALL = plotting.FONT_SIZE - 2
COLORS = {
    "SGD": "C0",
    "Adam": "C1",
    "DampedNewton, constant": "C2",
    "DampedNewton, bootstrap": "C3",
}


def _curves(axes, run: dict) -> None:
    for opt in run["optimizers"]:
        ev = opt["evals"]
        step = np.array([e["step"] for e in ev], dtype=float)
        sec = np.array([e["seconds"] for e in ev], dtype=float)
        style = dict(lw=0.9, color=COLORS[opt["optimizer"]], label=opt["optimizer"])
        loss = [e["train_loss"] for e in ev]
        acc = [e["test_accuracy"] for e in ev]
        axes[0].plot(step, loss, **style)
        axes[1].plot(np.maximum(sec, 1e-3), loss, **style)
        axes[2].plot(step, acc, **style)
        axes[3].plot(np.maximum(sec, 1e-3), acc, **style)
    for ax, (x, y) in zip(
        axes,
        (
            ("step", "training loss"),
            ("wall time of the steps [s]", "training loss"),
            ("step", "test accuracy"),
            ("wall time of the steps [s]", "test accuracy"),
        ),
    ):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if "loss" in y:
            ax.set_yscale("log")
        if "wall" in x:
            ax.set_xscale("log")
        plotting._style(ax)
    axes[0].set_title(f"{run['label']}, D = {run['num_params']:,}")
    axes[2].set_ylim(max(0.0, axes[2].get_ylim()[0]), 1.0)
    axes[3].set_ylim(axes[2].get_ylim())
    axes[0].legend(fontsize=SMALL, frameon=False)


def _window(values: list, width: int) -> np.ndarray:
    """Indices of the trailing window of ``width`` steps ending at each step."""
    return [slice(max(0, i + 1 - width), i + 1) for i in range(len(values))]


def _newton(ax_damping, ax_dirs, run: dict, top_k: int, width: int) -> None:
    for opt in run["optimizers"]:
        if not opt["optimizer"].startswith("DampedNewton"):
            continue
        color = COLORS[opt["optimizer"]]
        steps = opt["steps"]
        x = [s["step"] for s in steps]
        finite = [[d for d in s["damping"] if d is not None] for s in steps]
        xs = [s["step"] for s, f in zip(steps, finite) for _ in f]
        ax_damping.scatter(xs, sum(finite, []), s=2, color=color, alpha=0.3, lw=0)
        medians = [
            np.median(sum(finite[w], [])) if sum(finite[w], []) else np.nan
            for w in _window(finite, width)
        ]
        label = f"{opt['optimizer']} (median of {width} steps)"
        ax_damping.plot(x, medians, lw=1.0, color=color, label=label)
        dirs = np.array([s["num_directions"] for s in steps], dtype=float)
        ax_dirs.plot(x, dirs, lw=0.4, color=color, alpha=0.35)
        mean = [dirs[w].mean() for w in _window(dirs, width)]
        ax_dirs.plot(x, mean, lw=1.0, color=color, label=opt["optimizer"])
    ax_damping.set_yscale("log")
    ax_damping.set_xlabel("step")
    ax_damping.set_ylabel(r"damping $\delta_k$ (finite ones)")
    ax_damping.set_title(f"{run['label']}: dampings")
    ax_dirs.set_xlabel("step")
    ax_dirs.set_ylabel(f"directions stepped along ({width}-step mean)")
    ax_dirs.set_ylim(-0.5, top_k + 0.5)
    ax_dirs.set_title(f"{run['label']}: directions with finite δ")
    for ax in (ax_damping, ax_dirs):
        ax.legend(fontsize=SMALL, frameon=False)
        plotting._style(ax)


def make_figure(result: dict):
    runs = result["runs"]
    fig, axes = plotting.new_figure(ncols=4, nrows=len(runs) + 1)
    for i, run in enumerate(runs):
        _curves(axes[4 * i : 4 * i + 4], run)
    last = axes[4 * len(runs) :]
    for j, run in enumerate(runs):
        width = max(1, result["settings"]["steps"] // 15)
        _newton(last[j], last[len(runs) + j], run, result["settings"]["top_k"], width)
    return fig


if __name__ == "__main__":
    plot_main(__doc__, HERE, "optimizers", make_figure)
