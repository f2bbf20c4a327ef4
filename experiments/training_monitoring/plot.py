"""Plot ``results.json`` of ``run.py``: eigenspace overlaps and SNRs during training.

Reads only the JSON; writes ``figures/training_monitoring.png|pdf`` at the repository
root (``…_quick`` for a quick run). Panels: overlap of the mini-batch top-C GGN
eigenspace with the full-data one, and with the mini-batch Hessian's, against the SGD
step; the SNRs of the directional slopes γ and curvatures λ along the top-C GGN
eigenvectors at the last checkpoint.

    python experiments/training_monitoring/plot.py [--quick] [--json PATH] [--out DIR]
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


def make_figure(result: dict):
    s = result["settings"]
    C = s["top_c"]
    fig, axes = plotting.new_figure(ncols=2, nrows=2)
    for i, run in enumerate(result["runs"]):
        pts = run["points"]
        step = np.array([p["step"] for p in pts], dtype=float)
        x = np.maximum(step, 0.5)  # step 0 on the log axis
        style = {"color": f"C{i}", "label": run["label"]}
        # (a, b): overlaps against the step; (c, d): SNRs at the last checkpoint
        for ax, key in zip(axes[:2], ("overlap_mini_full", "overlap_ggn_hessian")):
            curve(ax, x, [p[key] for p in pts], **style)
        last = pts[-1]
        k = np.arange(1, len(last["gamma_snr"]) + 1)
        for ax, key in zip(axes[2:], ("gamma_snr", "lambda_snr")):
            curve(ax, k, last[key], **style)
    D = result["runs"][0]["num_params"]
    for ax, title in zip(
        axes[:2],
        (
            f"(a) mini-batch (N = {s['batch_size']}) vs full-data GGN",
            "(b) mini-batch GGN vs mini-batch Hessian",
        ),
    ):
        # a random C-dim subspace overlaps by C/D: drawn off the frame and labelled
        # on the line itself, so that it cannot be taken for the axis at 0
        ax.axhline(C / D, color="C7", ls=(0, (4, 2)), lw=1.2)
        ax.annotate(
            f"random {C}-dim subspace: C/D = {C / D:.3f}",
            (0.98, C / D),
            xycoords=("axes fraction", "data"),
            xytext=(0, 4),
            textcoords="offset points",
            ha="right",
            va="bottom",
            fontsize=SMALL,
            color="C7",
        )
        ax.set_xscale("log")
        ax.set_ylim(-0.08, 1.05)  # overlaps live in [0, 1]: a linear axis reads best
        ax.set_xlabel("SGD step (step 0 drawn at 0.5)")
        ax.set_ylabel(f"overlap of top-{C} eigenspaces")
        ax.set_title(title, fontsize=plotting.FONT_SIZE)
        ax.legend(fontsize=SMALL, frameon=False, loc="center left")
        plotting._style(ax)
    step = result["runs"][0]["points"][-1]["step"]
    for ax, q, tag in (
        (axes[2], r"$\gamma$ (slope)", "c"),
        (axes[3], r"$\lambda$ (curvature)", "d"),
    ):
        ax.axhline(1.0, color="0.4", ls="--", lw=0.8, label="SNR = 1")
        ax.set_yscale("log")
        ax.set_xlabel(r"GGN eigenvector $k$ (descending $\lambda_k$)")
        ax.set_ylabel(f"SNR of {q}")
        ax.set_title(
            f"({tag}) SNR along top-{C} directions, step {step}",
            fontsize=plotting.FONT_SIZE,
        )
        # below the SNR = 1 line, away from the curves
        where = {"loc": "lower center"} if tag == "c" else {"loc": "upper left"}
        if tag == "d":
            where["bbox_to_anchor"] = (0.0, 0.9)
        ax.legend(fontsize=SMALL, frameon=False, **where)
        plotting._style(ax)
    return fig


if __name__ == "__main__":
    plot_main(__doc__, HERE, "training_monitoring", make_figure)
