"""Plot ``results.json`` of ``run.py``: spectra with BN in train mode, eval mode, none.

Reads only the JSON and writes ``figures/digits_spectrum.pdf`` and ``.png`` at the
repository root (``digits_spectrum_quick.*`` with ``--quick``). One column per batch
size; top row: eigenvalue against index, bottom row: densities on a log scale.

    python experiments/digits_spectrum/plot.py [--quick] [--json PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowrank_ggn.app import plotting

HERE = Path(__file__).resolve().parent
FIGURES = HERE.parents[1] / "figures"


def make_figure(result: dict):
    sizes = result["settings"]["batch_sizes"]
    fig, axes = plotting.new_figure(ncols=len(sizes), nrows=2)
    top, bottom = axes[: len(sizes)], axes[len(sizes) :]
    for N, ax_i, ax_h in zip(sizes, top, bottom):
        spectra = {
            f"{r['label']} ({r['num_nonzero']})": r["eigenvalues"]
            for r in result["runs"]
            if r["batch_size"] == N
        }
        plotting.eigenvalue_index(spectra, ax_i)
        ax_i.set_title(
            f"batch N = {N}, CE, {result['settings']['train_steps']} SGD steps",
            fontsize=plotting.FONT_SIZE,
        )
        plotting.spectrum_histogram(spectra, ax_h, density=True, bins=30)
        ax_h.get_legend().remove()
        ax_i.legend(fontsize=plotting.FONT_SIZE - 2, frameon=False)
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
