"""Plot ``results.json`` of ``run.py``: exact vs approximate GGN spectra (ViViT Fig. 1).

Reads only the JSON; writes ``figures/spectrum_approximations.png|pdf`` at the
repository root (``…_quick`` for a quick run). One column per model (without and with
train-mode BatchNorm); rows: densities in ``log λ``, eigenvalue against index, and the
relative error of the top-k eigenvalues of each approximation.

    python experiments/spectrum_approximations/plot.py [--quick] [--json PATH] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/_common.py

from _common import plot_main  # noqa: E402

from lowrank_ggn.app import plotting  # noqa: E402


def make_figure(result: dict):
    s = result["settings"]
    runs = result["runs"]
    fig, axes = plotting.new_figure(ncols=len(runs), nrows=3)
    for col, run in enumerate(runs):
        ax_h, ax_i, ax_e = axes[col], axes[len(runs) + col], axes[2 * len(runs) + col]
        names = {
            "exact": "exact",
            "mc": f"MC, M = {s['mc_samples']}",
            "subsampled": f"sub-sampled, |S| = {run['subset_size']}",
            "block_diagonal": f"per-layer blocks, L = {len(run['blocks'])}",
        }
        spectra = {names[m]: v for m, v in run["eigenvalues"].items()}
        plotting.spectrum_histogram(spectra, ax_h, density=True, bins=30)
        ax_h.set_title(
            f"{run['label']}, N = {s['batch_size']}, D = {run['num_params']:,}",
            fontsize=plotting.FONT_SIZE,
        )
        ax_h.set_ylim(0, 1.6 * ax_h.get_ylim()[1])  # room for the legend
        ax_h.legend(fontsize=plotting.FONT_SIZE - 2, frameon=False, loc="upper left")
        plotting.eigenvalue_index(spectra, ax_i)
        ax_i.set_xscale("log")
        ax_i.legend(fontsize=plotting.FONT_SIZE - 2, frameon=False)
        for method, errors in run["topk_rel_error"].items():
            k = np.arange(1, len(errors) + 1)
            e = np.array([np.nan if v is None else v for v in errors])
            ax_e.plot(
                k,
                e,
                marker="o",
                markersize=2.5,
                linewidth=0.8,
                label=names[method],
                color=f"C{list(names).index(method)}",
            )
        ax_e.set_yscale("log")
        ax_e.set_xlabel(r"index $k$ (descending)")
        ax_e.set_ylabel(r"top-$k$ error $|\hat\lambda_k-\lambda_k|/\lambda_k$")
        ax_e.legend(fontsize=plotting.FONT_SIZE - 2, frameon=False)
        plotting._style(ax_e)
    return fig


if __name__ == "__main__":
    plot_main(__doc__, HERE, "spectrum_approximations", make_figure)
