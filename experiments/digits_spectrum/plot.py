"""Plot ``results.json`` of ``run.py``: spectra with BN in train mode, eval mode, none.

Reads only the JSON and writes ``figures/digits_spectrum.pdf`` and ``.png`` at the
repository root (``digits_spectrum_quick.*`` with ``--quick``). One column per batch
size; top row: eigenvalue against index, bottom row: the fraction of eigenvalues
``≤ λ`` (empirical CDF on a log axis; was six overlaid histograms), one line per model
with a legend. Solid: no BatchNorm or train mode; dashed: eval mode.

    python experiments/digits_spectrum/plot.py [--quick] [--json PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lowrank_ggn.app import plotting

HERE = Path(__file__).resolve().parent
FIGURES = HERE.parents[1] / "figures"


def _cdf(ax, runs: list[dict]) -> None:
    for i, r in enumerate(runs):
        ev = np.sort(np.array(r["eigenvalues"], dtype=float))
        ev = ev[ev > 0]
        frac = np.arange(1, ev.size + 1) / ev.size
        ax.step(
            ev,
            frac,
            where="post",
            lw=1.0,
            color=f"C{i}",
            ls="--" if r["label"].endswith("eval") else "-",
            label=f"{r['label']} ({r['num_nonzero']})",
        )
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(r"eigenvalue $\lambda$")
    ax.set_ylabel(r"fraction of eigenvalues $\leq \lambda$")
    ax.legend(fontsize=plotting.FONT_SIZE - 2, frameon=False, loc="upper left")
    plotting._style(ax)


def make_figure(result: dict):
    sizes = result["settings"]["batch_sizes"]
    fig, axes = plotting.new_figure(ncols=len(sizes), nrows=2)
    top, bottom = axes[: len(sizes)], axes[len(sizes) :]
    for N, ax_i, ax_c in zip(sizes, top, bottom):
        runs = [r for r in result["runs"] if r["batch_size"] == N]
        spectra = {f"{r['label']} ({r['num_nonzero']})": r["eigenvalues"] for r in runs}
        plotting.eigenvalue_index(spectra, ax_i)
        for line, r in zip(ax_i.get_lines(), runs):
            line.set_linestyle("--" if r["label"].endswith("eval") else "-")
        ax_i.set_title(
            f"batch N = {N}, CE, {result['settings']['train_steps']} SGD steps",
            fontsize=plotting.FONT_SIZE,
        )
        ax_i.legend(fontsize=plotting.FONT_SIZE - 2, frameon=False)
        _cdf(ax_c, runs)
        ax_c.set_title(
            f"batch N = {N}: CDF of the nonzero eigenvalues",
            fontsize=plotting.FONT_SIZE,
        )
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="plot the quick run")
    parser.add_argument("--json", type=Path, default=None, help="results JSON")
    parser.add_argument("--out", type=Path, default=None, help="figure folder")
    args = parser.parse_args(argv)
    stem = "digits_spectrum_quick" if args.quick else "digits_spectrum"
    source = args.json or HERE / f"{'results_quick' if args.quick else 'results'}.json"
    fig = make_figure(json.loads(source.read_text()))
    for path in plotting.save_figure(fig, (args.out or FIGURES) / stem):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
