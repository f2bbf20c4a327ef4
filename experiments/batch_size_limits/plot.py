"""Plot ``results.json`` of ``run.py``: the largest batch per strategy under a budget.

Reads only the JSON; writes ``figures/batch_size_limits.png|pdf`` at the repository
root (``…_quick`` for a quick run). One panel per model; per method, the largest
``N`` for the exact spectrum and for the Monte-Carlo one (log axis), annotated with
the measured peak memory of the run at the limit as a fraction of the budget.

    python experiments/batch_size_limits/plot.py [--quick] [--json PATH] [--out DIR]
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
VARIANTS = {"exact": "exact (N·C columns)", "mc": "MC, M = 1 (N columns)"}


def make_figure(result: dict):
    s = result["settings"]
    rows = result["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plotting.new_figure(ncols=len(models), sharex=True)
    for ax, model in zip(axes, models):
        methods = list(dict.fromkeys(r["method"] for r in rows if r["model"] == model))
        y = np.arange(len(methods))
        for j, (variant, label) in enumerate(VARIANTS.items()):
            for i, method in enumerate(methods):
                r = next(
                    (
                        r
                        for r in rows
                        if r["model"] == model
                        and r["method"] == method
                        and r["variant"] == variant
                    ),
                    None,
                )
                if r is None or not r["limit_N"]:
                    continue
                pos = i + (j - 0.5) * 0.38
                ax.barh(
                    pos,
                    r["limit_N"],
                    height=0.36,
                    color=f"C{j}",
                    label=label if i == 0 else None,
                    hatch=None if r.get("confirmed") else "////",
                )
                at = r.get("run_at_limit") or {}
                peak = at.get("peak_bytes")
                note = f"{r['limit_N']}"
                if peak is not None:
                    note += f"  ({peak / s['budget_bytes']:.2f}·B)"
                ax.text(r["limit_N"] * 1.05, pos, note, va="center", fontsize=SMALL - 1)
        ax.set_yticks(y, [m.replace("_", "-") for m in methods])
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(right=ax.get_xlim()[1] * 4)
        ax.set_xlabel("largest batch size $N$")
        ax.set_title(
            f"{model}, B = {s['budget_bytes'] / 2**20:g} MiB, {s['dtype']}",
            fontsize=plotting.FONT_SIZE,
        )
        plotting._style(ax)
        ax.tick_params(axis="y", labelsize=plotting.FONT_SIZE - 1)
    axes[0].set_ylabel("lowrank_ggn strategy / vivit")
    axes[-1].legend(
        fontsize=SMALL,
        frameon=False,
        loc="lower right",
        title="(x·B): measured peak at the limit",
        title_fontsize=SMALL,
    )
    return fig


if __name__ == "__main__":
    plot_main(__doc__, HERE, "batch_size_limits", make_figure)
