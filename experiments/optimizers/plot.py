"""Plot ``results.json`` of ``run.py``: SGD, Adam and damped Newton, several seeds.

Reads only the JSON; writes ``figures/optimizers.png|pdf`` at the repository root
(``…_quick`` for a quick run). One row per problem: training loss and test error rate
(test loss for the regression), each against the step and against the wall time of
the optimiser steps; lines are the median over the seeds, bands their range (min to
max). The wall-time panels start at each optimiser's first evaluation after a step
(no point at t = 0 on the log axis), at the median time over the seeds. Last row:
the dampings damped Newton used (every finite ``δ_k`` of every seed as a dot; line:
the median over a trailing window) and the directions it stepped along (mean over
the window and the seeds).

    python experiments/optimizers/plot.py [--quick] [--json PATH] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

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


def _table(opt: dict, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, times ``[seeds, T]`` and values ``[seeds, T]`` of the common evals."""
    evals = [r["evals"] for r in opt["runs"]]
    T = min(len(e) for e in evals)  # a diverged seed stops early
    steps = np.array([e["step"] for e in evals[0][:T]], dtype=float)
    seconds = np.array([[e["seconds"] for e in ev[:T]] for ev in evals])
    values = np.array([[e.get(key, np.nan) for e in ev[:T]] for ev in evals])
    return steps, seconds, values


def _log_y(ax) -> None:
    """Log axis with plain labels at 1, 2 and 5 per decade."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _band(ax, x, values, color: str, label: str) -> None:
    ax.plot(x, np.median(values, 0), lw=1.0, color=color, label=label)
    if values.shape[0] > 1:
        ax.fill_between(x, values.min(0), values.max(0), color=color, alpha=0.2, lw=0)


def _curves(axes, prob: dict, seeds: int) -> None:
    metric = "test_error" if prob["classification"] else "test_loss"
    ylabel = "test error rate" if prob["classification"] else "test loss (MSE)"
    for opt in prob["optimizers"]:
        color = COLORS[opt["optimizer"]]
        label = f"{opt['optimizer']} (lr {opt['lr']:g})"
        for (ax_step, ax_time), key in zip(
            (axes[0:2], axes[2:4]), ("train_loss", metric)
        ):
            steps, seconds, values = _table(opt, key)
            _band(ax_step, steps, values, color, label)
            after = steps > 0  # t = 0 has no place on a log axis: not drawn
            _band(
                ax_time, np.median(seconds[:, after], 0), values[:, after], color, label
            )
    name = prob["problem"]
    titles = (
        f"{name}: training loss per step",
        f"{name}: training loss per second",
        f"{name}: {ylabel} per step",
        f"{name}: {ylabel} per second",
    )
    ylabels = ("training loss", "training loss", ylabel, ylabel)
    for ax, title, y in zip(axes, titles, ylabels):
        ax.set_title(title, fontsize=plotting.FONT_SIZE)
        ax.set_ylabel(y)
        _log_y(ax)
        plotting._style(ax)
    for ax in axes[0::2]:
        ax.set_xlabel("step")
    for ax in axes[1::2]:
        ax.set_xscale("log")
        ax.set_xlabel("wall time of the steps [s]")
    axes[0].legend(
        fontsize=SMALL,
        frameon=False,
        title=f"{prob['label']}, D = {prob['num_params']:,};\n"
        f"median and range of {seeds} seeds",
        title_fontsize=SMALL,
    )


def _window(n: int, width: int) -> list[slice]:
    """The trailing window of ``width`` steps ending at each step."""
    return [slice(max(0, i + 1 - width), i + 1) for i in range(n)]


def _newton(ax_damping, ax_dirs, prob: dict, width: int, top_k: int) -> None:
    for opt in prob["optimizers"]:
        if not opt["optimizer"].startswith("DampedNewton"):
            continue
        color = COLORS[opt["optimizer"]]
        T = min(len(r["steps"]) for r in opt["runs"])
        x = np.arange(1, T + 1)
        finite = [
            [d for r in opt["runs"] for d in r["steps"][t]["damping"] if d is not None]
            for t in range(T)
        ]
        xs = [t + 1 for t, f in enumerate(finite) for _ in f]
        ax_damping.scatter(xs, sum(finite, []), s=2, color=color, alpha=0.3, lw=0)
        medians = [
            np.median(sum(finite[w], [])) if sum(finite[w], []) else np.nan
            for w in _window(T, width)
        ]
        ax_damping.plot(x, medians, lw=1.0, color=color, label=opt["optimizer"])
        dirs = np.array(
            [[r["steps"][t]["num_directions"] for t in range(T)] for r in opt["runs"]],
            dtype=float,
        ).mean(0)
        mean = [dirs[w].mean() for w in _window(T, width)]
        ax_dirs.plot(x, mean, lw=1.0, color=color, label=opt["optimizer"])
    ax_damping.set_yscale("log")
    ax_damping.set_xlabel("step")
    ax_damping.set_ylabel(r"damping $\delta_k$ (finite ones)")
    ax_damping.set_title(
        f"{prob['problem']}: dampings ({width}-step median)",
        fontsize=plotting.FONT_SIZE,
    )
    ax_dirs.set_xlabel("step")
    ax_dirs.set_ylabel("directions stepped along")
    ax_dirs.set_ylim(-0.5, top_k + 0.5)
    ax_dirs.set_title(
        f"{prob['problem']}: directions stepped ({width}-step mean)",
        fontsize=plotting.FONT_SIZE,
    )
    for ax in (ax_damping, ax_dirs):
        ax.legend(fontsize=SMALL, frameon=False)
        plotting._style(ax)


def make_figure(result: dict):
    s = result["settings"]
    probs = result["problems"]
    fig, axes = plotting.new_figure(ncols=4, nrows=len(probs) + 1)
    for i, prob in enumerate(probs):
        _curves(axes[4 * i : 4 * i + 4], prob, s["seeds"])
    last = axes[4 * len(probs) :]
    width = max(1, s["steps"] // 15)
    for j, prob in enumerate(probs):
        _newton(last[j], last[len(probs) + j], prob, width, 10)
    return fig


if __name__ == "__main__":
    plot_main(__doc__, HERE, "optimizers", make_figure)
