"""Plot ``results.json`` of ``run.py``: per-layer GGN diagonal through training.

Reads only the JSON; writes ``figures/ggn_diagonal.png|pdf`` at the repository root
(``…_quick`` for a quick run). Panels: (a, b) the mean diagonal entry of each layer
against the SGD step, without and with BatchNorm in train mode, the 10–90 % quantile
band of the layer's entries shaded (zero entries, dead ReLU units, sit at the axis
floor); (c) each layer's share of ``tr G`` at the last checkpoint; (d) the relative
error of the one-sample Monte-Carlo estimate of the layers' traces against the step
(median and range over the layers).

    python experiments/ggn_diagonal/plot.py [--quick] [--json PATH] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/_common.py

from _common import curve, plot_main  # noqa: E402

from lowrank_ggn.app import plotting  # noqa: E402

SMALL = plotting.FONT_SIZE - 2


def _layer_label(run: dict, j: int) -> str:
    layer = run["points"][0]["layers"][j]
    return f"{layer['kind']} (D={layer['D']})"


def _short(kind: str) -> str:
    """``"BatchNorm2d 1"`` -> ``"bn1"``: tick labels that fit."""
    name, _, k = kind.rpartition(" ")
    return {"Conv2d": "conv", "BatchNorm2d": "bn", "Linear": "fc"}.get(name, name) + k


def make_figure(result: dict):
    s = result["settings"]
    fig, axes = plotting.new_figure(ncols=2, nrows=2)
    runs = result["runs"]
    for ax, run, tag in zip(axes[:2], runs, "ab"):
        pts = run["points"]
        x = np.maximum(np.array([p["step"] for p in pts], dtype=float), 0.5)
        for j in range(len(pts[0]["layers"])):
            mean = [p["layers"][j]["mean_diag"] for p in pts]
            lo = [p["layers"][j]["quantiles"][0] for p in pts]
            hi = [p["layers"][j]["quantiles"][2] for p in pts]
            curve(ax, x, mean, color=f"C{j}", label=_layer_label(run, j))
            ax.fill_between(x, lo, hi, color=f"C{j}", alpha=0.15, lw=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        means = [la["mean_diag"] for p in pts for la in p["layers"]]
        ax.set_ylim(bottom=min(means) / 10)  # zero entries (dead ReLUs) at the floor
        ax.set_xlabel("SGD step (step 0 drawn at 0.5)")
        ax.set_ylabel("GGN diagonal entry")
        ax.set_title(
            f"({tag}) {run['label']}: layer mean, 10–90 % band",
            fontsize=plotting.FONT_SIZE,
        )
        ax.legend(fontsize=SMALL, frameon=False, ncol=2)
        plotting._style(ax)
    # (c): layers lined up by kind across the models (the BN model has more)
    widest = max(runs, key=lambda r: len(r["points"][0]["layers"]))
    kinds = [la["kind"] for la in widest["points"][0]["layers"]]
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        shift = (i - (len(runs) - 1) / 2) * width
        pos = np.array([kinds.index(la["kind"]) for la in run["points"][0]["layers"]])
        share = [la["trace_share"] for la in run["points"][-1]["layers"]]
        axes[2].bar(pos + shift, share, width, color=f"C{i}", label=run["label"])
    axes[2].set_xticks(range(len(kinds)), [_short(k) for k in kinds])
    axes[2].set_ylabel(r"share of tr $G$")
    axes[2].set_title(
        f"(c) per-layer share of tr G, step {runs[0]['points'][-1]['step']}",
        fontsize=plotting.FONT_SIZE,
    )
    # (d): the one-sample MC estimate's error against the step, median over layers
    for i, run in enumerate(runs):
        pts = run["points"]
        x = np.maximum(np.array([p["step"] for p in pts], dtype=float), 0.5)
        errs = np.array([[la["mc_rel_error"] for la in p["layers"]] for p in pts])
        curve(axes[3], x, np.median(errs, axis=1), color=f"C{i}", label=run["label"])
        axes[3].fill_between(
            x, errs.min(axis=1), errs.max(axis=1), color=f"C{i}", alpha=0.15, lw=0
        )
    axes[3].set_xscale("log")
    axes[3].set_yscale("log")
    axes[3].set_xlabel("SGD step (step 0 drawn at 0.5)")
    axes[3].set_ylabel("relative error of a layer's trace")
    axes[3].set_title(
        "(d) MC estimate, one sample: median, range over layers",
        fontsize=plotting.FONT_SIZE,
    )
    for ax in axes[2:]:
        ax.legend(fontsize=SMALL, frameon=False)
        plotting._style(ax)
    fig.suptitle(
        f"exact GGN diagonal, N = {s['batch_size']} digits, float64",
        fontsize=plotting.FONT_SIZE,
    )
    return fig


if __name__ == "__main__":
    plot_main(__doc__, HERE, "ggn_diagonal", make_figure)
