"""Plot ``results.json`` of ``run.py``: the largest batch per strategy under a budget.

Reads only the JSON; writes ``figures/batch_size_limits.png|pdf`` at the repository
root (``…_quick`` for a quick run). One panel per model; per method (lowrank_ggn
strategies and vivit, all bisected on the measured peak), the largest ``N`` for the
exact spectrum and for the Monte-Carlo one (log axis), annotated with the measured
peak memory of the run at the limit as a fraction of the budget. Dashed lines: the
largest ``N`` the package itself admits (its estimate), with that run's measured peak.

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
    limits = [r["limit_N"] for r in rows if r["limit_N"]] + [
        a["package_largest_N"]
        for a in result.get("package_limits", [])
        if a["package_largest_N"]
    ]
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
        for j, variant in enumerate(VARIANTS):
            adm = next(
                (
                    a
                    for a in result.get("package_limits", [])
                    if a["model"] == model and a["variant"] == variant
                ),
                None,
            )
            if adm is None or not adm["package_largest_N"]:
                continue
            n = adm["package_largest_N"]
            ax.axvline(n, color=f"C{j}", ls="--", lw=0.8, label=None)
            peak = (adm.get("run_at_limit") or {}).get("peak_bytes")
            note = f"admits {n}" + (
                f" ({peak / s['budget_bytes']:.2f}·B)" if peak is not None else ""
            )
            top = j == 0  # exact's note above the bars, MC's below
            ax.text(
                n * 1.04,
                -0.58 if top else len(methods) - 0.42,
                note,
                color=f"C{j}",
                va="bottom" if top else "top",
                fontsize=SMALL - 1,
            )
        ax.set_yticks(y, [m.replace("_", "-") for m in methods])
        ax.set_xscale("log")
        ax.set_xlim(min(limits) / 1.6, max(limits) * 3)  # shared: room for notes
        ax.set_ylim(len(methods) - 0.5 + 0.35, -0.5 - 0.45)
        ax.set_xlabel("largest batch size $N$")
        ax.set_title(
            f"{model}, B = {s['budget_bytes'] / 2**20:g} MiB, {s['dtype']}",
            fontsize=plotting.FONT_SIZE,
        )
        plotting._style(ax)
        ax.tick_params(axis="y", labelsize=plotting.FONT_SIZE - 1)
    axes[0].set_ylabel("lowrank_ggn strategy / vivit")
    fig.legend(
        *axes[0].get_legend_handles_labels(),
        fontsize=SMALL,
        frameon=False,
        loc="outside lower center",
        ncols=2,
        title="(x·B): measured peak at the limit; dashed: largest N the package "
        "admits (its own estimate)",
        title_fontsize=SMALL,
    )
    return fig


if __name__ == "__main__":
    plot_main(__doc__, HERE, "batch_size_limits", make_figure)
