"""Plot ``results.json`` of ``run.py``: time to the top-k eigenpairs against k.

Reads only the JSON; writes ``figures/topk_runtime.png|pdf`` at the repository root
(``…_quick`` for a quick run). One panel per model (3c3d without and with train-mode
BatchNorm), log-log. The dense solver is timed once at the largest k (all eigenvalues
plus k eigenvectors) and drawn as a horizontal line: an upper bound for smaller k.
Each panel has its own legend below it, with the cut-offs of that model's runs.

    python experiments/topk_runtime/plot.py [--quick] [--json PATH] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/_common.py

from _common import plot_main  # noqa: E402

from lowrank_ggn.app import plotting  # noqa: E402

LABELS = {
    "dense": "lowrank_ggn dense",
    "lanczos": "lowrank_ggn Lanczos",
    "curvlinops": "curvlinops + eigsh",
    "power": "deflated power iteration",
}
MARKERS = {"dense": "s", "lanczos": "o", "curvlinops": "^", "power": "v"}


def make_figure(result: dict):
    s = result["settings"]
    records = result["records"]
    models = list(dict.fromkeys(r["model"] for r in records))
    fig, axes = plotting.new_figure(ncols=len(models), sharey=True)
    kmax = max(s["k_peers"] + s["k_lanczos"])
    for ax, model in zip(axes, models):
        rows = [r for r in records if r["model"] == model]
        for i, method in enumerate(LABELS):
            done = [r for r in rows if r["method"] == method and "seconds" in r]
            if not done:
                continue
            label = LABELS[method]
            cut = [r for r in rows if r["method"] == method and "skipped_k" in r]
            if cut:
                label += f" (k > {done[-1]['k']}: > {s['cap_s']:.0f} s, not run)"
            k = [r["k"] for r in done]
            t = [r["seconds"] for r in done]
            if method == "dense":
                ax.hlines(t[0], 1, kmax, color=f"C{i}", linestyle="--", linewidth=0.8)
                label += f" (all λ; timed at k = {k[0]})"
            ax.plot(
                k,
                t,
                marker=MARKERS[method],
                markersize=3,
                linewidth=0.8,
                color=f"C{i}",
                label=label,
            )
        for method, why in result.get("skipped", {}).items():
            ax.plot([], [], " ", label=f"{LABELS[method]}: skipped ({why})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(r"number of eigenpairs $k$")
        ax.set_ylabel("wall time [s]")
        ax.set_title(
            f"{model}, N = {s['batch_size']}, {s['dtype']}, one thread",
            fontsize=plotting.FONT_SIZE,
        )
        plotting._style(ax)
        # each panel its own legend: the cut-off notes differ between the models
        ax.legend(
            fontsize=plotting.FONT_SIZE - 2,
            frameon=False,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.3),
        )
    return fig


if __name__ == "__main__":
    plot_main(__doc__, HERE, "topk_runtime", make_figure)
