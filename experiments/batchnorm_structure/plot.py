"""Plot ``results.json`` of ``run.py``: what train-mode BatchNorm does to the GGN.

Reads only the JSON; writes ``figures/batchnorm_structure.png|pdf`` at the repository
root (``…_quick`` for a quick run). Panels: (a) the per-sample shortcut's spectrum
error against N (and vivit's, where measured); (b) per-component against per-sample
gradient norms; (c) top eigenvalues against the bulk, with and without BatchNorm;
(d) how much of each top-C eigenvector lies in the span of the class-mean gradients.

    python experiments/batchnorm_structure/plot.py [--quick] [--json PATH] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/_common.py

from _common import curve, plot_main  # noqa: E402

from lowrank_ggn.app import plotting  # noqa: E402

SMALL = plotting.FONT_SIZE - 2


def panel_shortcut(ax, result: dict) -> None:
    rows = result["shortcut"]["rows"]
    top_k = result["settings"]["top_k"]
    viv = [r for r in rows if "vivit_topk_rel_error" in r]
    # the frozen-statistics copy at every N (C0); vivit where it ran (C3)
    for subset, key, color, name, long_name in (
        (rows, "", "C0", "frozen", "frozen statistics"),
        (viv, "vivit_", "C3", "vivit", "vivit"),
    ):
        if not subset:
            continue
        N = [r["N"] for r in subset]
        topk = [r[key + "topk_rel_error"] for r in subset]
        curve(
            ax, N, [t[0] for t in topk], color=color, label=rf"{long_name}: $\lambda_1$"
        )
        mean_label = f"{name}: mean top-{top_k}"
        curve(ax, N, [np.mean(t) for t in topk], "s--", color=color, label=mean_label)
        trace = [r[key + "trace_rel_error"] for r in subset]
        curve(ax, N, trace, "^:", color=color, label=f"{name}: trace")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    # the errors span 0.1–5: labelled ticks at 1, 2 and 5 per decade
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("batch size $N$")
    ax.set_ylabel("relative error vs exact train-mode GGN")
    ax.set_title("(a) per-sample shortcuts, cnn-bn", fontsize=plotting.FONT_SIZE)
    ax.legend(fontsize=SMALL, frameon=False, ncol=2)
    plotting._style(ax)


def panel_moments(ax, result: dict) -> None:
    m = result["moments"]
    comp = np.array(m["per_component"]["norms"])
    samp = np.array(m["per_sample_frozen"]["norms"])
    edges = np.logspace(
        np.log10(min(comp.min(), samp.min())), np.log10(max(comp.max(), samp.max())), 25
    )
    ax.hist(
        comp,
        edges,
        histtype="step",
        color="C0",
        label=f"per-component, train mode (total SNR {m['per_component']['total_snr']:.3f})",
    )
    ax.hist(
        samp,
        edges,
        histtype="step",
        color="C1",
        label=f"per-sample, frozen stats (total SNR {m['per_sample_frozen']['total_snr']:.3f})",
    )
    ax.set_xscale("log")
    ax.set_xlabel(r"gradient norm $\|u_n\|_2$")
    ax.set_ylabel("count")
    ax.set_title(
        f"(b) gradient rows, cnn-bn, N = {m['N']}", fontsize=plotting.FONT_SIZE
    )
    ax.set_ylim(0, 1.5 * ax.get_ylim()[1])
    ax.legend(fontsize=SMALL, frameon=False, loc="upper left")
    plotting._style(ax)


def panel_outliers(ax, result: dict) -> None:
    steps = max(r["train_steps"] for r in result["outliers"])
    for i, name in enumerate(("cnn", "cnn-bn")):
        rows = [
            r
            for r in result["outliers"]
            if r["model"] == name and r["train_steps"] == steps
        ]
        share = np.mean([r["topC_trace_share"] for r in rows])
        label = f"{name} (train BN)" if "bn" in name else name
        for j, r in enumerate(rows):
            ev = np.array(r["eigenvalues"][:50])
            ax.plot(
                np.arange(1, ev.size + 1),
                ev / ev[0],
                lw=0.8,
                color=f"C{i}",
                alpha=1.0 if j == 0 else 0.5,
                label=f"{label}: top-C share {share:.2f}" if j == 0 else None,
            )
    ax.axvline(10.5, color="0.4", ls="--", lw=0.8)
    ax.text(11.2, 0.5, "k = C = 10", fontsize=SMALL, color="0.3", va="center")
    ax.set_yscale("log")
    ax.set_xlabel(r"index $k$ (descending)")
    ax.set_ylabel(r"$\lambda_k / \lambda_1$")
    ax.set_title(
        f"(c) top of the exact GGN spectrum, {steps} SGD steps",
        fontsize=plotting.FONT_SIZE,
    )
    # the curves fall from the top left: the legend sits at the bottom right, below
    # them and right of the k = C line
    low = min(
        min(r["eigenvalues"][:50]) / r["eigenvalues"][0] for r in result["outliers"]
    )
    ax.set_ylim(low / 30, 1.5)
    ax.legend(
        fontsize=SMALL,
        frameon=False,
        loc="lower right",
        title=f"{len(rows)} seeds each (faint: seeds 2–{len(rows)})",
        title_fontsize=SMALL,
    )
    plotting._style(ax)


def panel_classes(ax, result: dict) -> None:
    for i, r in enumerate(result["class_structure"]):
        frac = r["per_direction_in_classmeans"]
        curve(
            ax,
            np.arange(1, len(frac) + 1),
            frac,
            color=f"C{i}",
            label=f"{r['model']}: top-C overlap {r['overlap_topC_classmeans']:.2f}",
        )
    base = result["class_structure"][0]["random_baseline"]
    ax.axhline(
        base, color="0.4", ls="--", lw=0.8, label=f"random direction ({base:.3f})"
    )
    ax.set_yscale("log")
    ax.set_xlabel(r"GGN eigenvector $k$")
    ax.set_ylabel(r"$\|P_{\mathrm{class\ means}}\, e_k\|^2$")
    ax.set_title(
        f"(d) class-mean gradients, N = {result['class_structure'][0]['N']}",
        fontsize=plotting.FONT_SIZE,
    )
    ax.legend(fontsize=SMALL, frameon=False)
    plotting._style(ax)


def make_figure(result: dict):
    fig, axes = plotting.new_figure(ncols=2, nrows=2)
    panel_shortcut(axes[0], result)
    panel_moments(axes[1], result)
    panel_outliers(axes[2], result)
    panel_classes(axes[3], result)
    return fig


if __name__ == "__main__":
    plot_main(__doc__, HERE, "batchnorm_structure", make_figure)
