r"""Plotting helpers for spectra and signal-to-noise ratios, sized for a paper column.

Every function draws into a given ``matplotlib`` axes, or creates a figure of one
panel ``PANEL_WIDTH × PANEL_HEIGHT`` inches (a single column of a two-column paper)
when ``ax`` is ``None``, and returns the axes. Figures are created without
:mod:`matplotlib.pyplot` (``matplotlib.figure.Figure`` with an Agg canvas), so the
helpers work headless, leave pyplot's global state alone, and never open windows.

Inputs may be tensors (any dtype/device) or array-likes; a mapping
``{label: values}`` draws several series with a legend.

matplotlib is imported inside the functions: the core package does not need it
(``pip install lowrank_ggn[plot]``).

Example:
    >>> import torch
    >>> from lowrank_ggn.app.plotting import spectrum_figure
    >>> fig = spectrum_figure({"exact": torch.tensor([3.0, 1.0, 0.1]),
    ...                        "MC": torch.tensor([2.5, 1.2])})
    >>> len(fig.axes)
    2

"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

#: Width of one panel in inches (one column of a two-column paper).
PANEL_WIDTH = 3.25
#: Height of one panel in inches.
PANEL_HEIGHT = 2.4
#: Font size for labels; ticks and legends are one point smaller.
FONT_SIZE = 8

Series = Any  # a Tensor, numpy array or sequence of floats
Spectra = Mapping[str, Series] | Series


def _as_array(values: Series) -> np.ndarray:
    """A 1-d float64 numpy array from a tensor (any device/dtype) or array-like."""
    if hasattr(values, "detach"):
        values = values.detach().to("cpu").double().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _as_dict(spectra: Spectra, label: str | None) -> dict[str, np.ndarray]:
    if isinstance(spectra, Mapping):
        return {str(k): _as_array(v) for k, v in spectra.items()}
    return {label or "": _as_array(spectra)}


def _style(ax) -> None:
    ax.tick_params(labelsize=FONT_SIZE - 1)
    ax.xaxis.label.set_size(FONT_SIZE)
    ax.yaxis.label.set_size(FONT_SIZE)
    ax.title.set_size(FONT_SIZE)
    ax.grid(True, which="major", alpha=0.3, linewidth=0.5)


def _legend(ax, labels: Iterable[str]) -> None:
    if any(labels) or ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=FONT_SIZE - 1, frameon=False)


def _shade_unresolved(ax, lo: float, hi: float, axis: str) -> None:
    """Grey band ``[lo, hi]`` along ``axis``, labelled as unresolved."""
    span = ax.axvspan if axis == "x" else ax.axhspan
    span(lo, hi, color="0.85", zorder=0, linewidth=0, label="unresolved")


def new_figure(ncols: int = 1, nrows: int = 1, **kwargs):
    """A pyplot-free figure of ``nrows × ncols`` panels, each one column wide.

    Returns:
        ``(figure, axes)`` with ``axes`` a flat list of length ``nrows·ncols``.

    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(
        figsize=(PANEL_WIDTH * ncols, PANEL_HEIGHT * nrows), layout="constrained"
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, [ax for row in axes for ax in row]


def _axes(ax):
    return new_figure()[1][0] if ax is None else ax


def log_bins(spectra: Mapping[str, np.ndarray], bins: int) -> np.ndarray:
    """``bins + 1`` logarithmically spaced edges covering all positive values."""
    positive = [v[v > 0] for v in spectra.values()]
    positive = np.concatenate(positive) if positive else np.array([])
    if positive.size == 0:
        return np.logspace(-1, 1, bins + 1)
    lo, hi = positive.min(), positive.max()
    if lo == hi:
        lo, hi = lo / 2, hi * 2
    return np.logspace(np.log10(lo), np.log10(hi), bins + 1)


def spectrum_histogram(
    spectra: Spectra,
    ax=None,
    *,
    bins: int = 40,
    density: bool = False,
    label: str | None = None,
    xlabel: str = r"eigenvalue $\lambda$",
    unresolved: float | None = None,
):
    r"""Histogram (or density) of the positive eigenvalues on a logarithmic axis.

    Bins are equally wide in ``log λ``, shared by all series; with ``density=True``
    each series integrates to 1 over ``log₁₀ λ`` (densities of spectra with different
    numbers of eigenvalues become comparable). Non-positive values are not drawn.

    Args:
        spectra: Eigenvalues ``[K]``, or ``{label: eigenvalues}`` for several.
        ax: Axes to draw into; a new one-column figure if ``None``.
        bins: Number of logarithmic bins.
        density: Normalise to a density in ``log₁₀ λ`` instead of counts.
        label: Legend label for a single series.
        xlabel: Label of the eigenvalue axis.
        unresolved: Shade ``λ ≤ unresolved``: the region the error model could not
            resolve (``GGNSpectrum.threshold``); eigenvalues there are missing.

    Returns:
        The axes.

    """
    ax = _axes(ax)
    series = _as_dict(spectra, label)
    edges = log_bins(series, bins)
    if unresolved:
        lo = min(edges[0], unresolved / 10)
        edges = np.concatenate([[lo], edges]) if lo < edges[0] else edges
        _shade_unresolved(ax, lo, unresolved, "x")
    width = np.diff(np.log10(edges))
    for name, values in series.items():
        values = values[values > 0]
        counts, _ = np.histogram(values, edges)
        if density and values.size:
            counts = counts / (values.size * width)
        ax.stairs(counts, edges, label=f"{name} ({values.size})" if name else None)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(r"density in $\log_{10}\lambda$" if density else "count")
    _legend(ax, series)
    _style(ax)
    return ax


def compare_spectra(
    spectra: Mapping[str, Series],
    ax=None,
    *,
    kind: str = "index",
    **kwargs,
):
    """Several labelled spectra in one panel (e.g. exact vs MC vs sub-sampled).

    Args:
        spectra: ``{label: eigenvalues}``.
        ax: Axes to draw into; a new one-column figure if ``None``.
        kind: ``"index"`` (eigenvalue against index, :func:`eigenvalue_index`) or
            ``"histogram"`` (:func:`spectrum_histogram`, densities).
        **kwargs: Passed on to the chosen function.

    Returns:
        The axes.

    """
    if not isinstance(spectra, Mapping):
        raise TypeError("spectra must be a mapping {label: eigenvalues}.")
    if kind == "index":
        return eigenvalue_index(spectra, ax, **kwargs)
    if kind == "histogram":
        kwargs.setdefault("density", True)
        return spectrum_histogram(spectra, ax, **kwargs)
    raise ValueError(f"kind must be 'index' or 'histogram'; got {kind!r}.")


def eigenvalue_index(
    spectra: Spectra,
    ax=None,
    *,
    label: str | None = None,
    relative: bool = False,
    unresolved: float | None = None,
):
    r"""Eigenvalues, sorted descending, against their index ``k = 1, 2, …`` (log ``λ``).

    Args:
        spectra: Eigenvalues ``[K]``, or ``{label: eigenvalues}`` for several.
        ax: Axes to draw into; a new one-column figure if ``None``.
        label: Legend label for a single series.
        relative: Plot ``λ_k / λ_1`` instead of ``λ_k``.
        unresolved: Shade ``λ ≤ unresolved`` (absolute, divided by the first
            series' ``λ_1`` when ``relative``): the unresolved region.

    Returns:
        The axes.

    """
    ax = _axes(ax)
    series = _as_dict(spectra, label)
    if unresolved:
        first = next((v[v > 0] for v in series.values() if (v > 0).any()), None)
        scale = first.max() if relative and first is not None else 1.0
        values = np.concatenate([v[v > 0] for v in series.values()] or [[1.0]])
        lo = min(values.min() / scale, unresolved / scale) / 10
        _shade_unresolved(ax, lo, unresolved / scale, "y")
    for name, values in series.items():
        values = np.sort(values[values > 0])[::-1]
        if relative and values.size:
            values = values / values[0]
        k = np.arange(1, values.size + 1)
        ax.plot(k, values, marker=".", markersize=2, linewidth=0.8, label=name or None)
    ax.set_yscale("log")
    ax.set_xlabel(r"index $k$ (descending)")
    ax.set_ylabel(r"$\lambda_k / \lambda_1$" if relative else r"eigenvalue $\lambda_k$")
    _legend(ax, series)
    _style(ax)
    return ax


def directional_snr(
    snr: Spectra,
    ax=None,
    *,
    label: str | None = None,
    quantity: str = r"$\gamma$",
):
    r"""Signal-to-noise ratio of directional derivatives per direction ``k``.

    ``SNR_k = mean_n(γ_nk)² / var_n(γ_nk)`` (or the analogous curvature ``λ_nk``),
    one value per direction, on a log axis with the line ``SNR = 1`` where signal and
    noise are equal.

    Args:
        snr: ``[K]`` SNRs (one per direction), or ``{label: [K]}`` for several.
        ax: Axes to draw into; a new one-column figure if ``None``.
        label: Legend label for a single series.
        quantity: Name of the quantity in the axis label (LaTeX).

    Returns:
        The axes.

    """
    ax = _axes(ax)
    series = _as_dict(snr, label)
    for name, values in series.items():
        k = np.arange(1, values.size + 1)
        ax.plot(
            k, values, marker="o", markersize=2.5, linewidth=0.8, label=name or None
        )
    ax.axhline(1.0, color="0.4", linestyle="--", linewidth=0.8, label="SNR = 1")
    ax.set_yscale("log")
    ax.set_xlabel(r"direction $k$")
    ax.set_ylabel(f"SNR of {quantity}")
    _legend(ax, [*series, "SNR = 1"])
    _style(ax)
    return ax


def spectrum_figure(
    spectra: Spectra,
    *,
    title: str | None = None,
    bins: int = 40,
    unresolved: float | None = None,
):
    """Two panels side by side: log-scale histogram and eigenvalue against index.

    Args:
        spectra: Eigenvalues ``[K]`` or ``{label: eigenvalues}`` (all in both panels).
        title: Figure title.
        bins: Logarithmic bins of the histogram.
        unresolved: Shade ``λ ≤ unresolved`` in both panels (``GGNSpectrum.threshold``
            or the largest of several).

    Returns:
        The ``matplotlib.figure.Figure`` (``2 × PANEL_WIDTH`` inches wide).

    """
    fig, (left, right) = new_figure(ncols=2)
    spectrum_histogram(spectra, left, bins=bins, unresolved=unresolved)
    eigenvalue_index(spectra, right, unresolved=unresolved)
    if title:
        fig.suptitle(title, fontsize=FONT_SIZE)
    return fig


def save_figure(
    fig, path: str | Path, formats: Iterable[str] = ("png", "pdf")
) -> list[Path]:
    """Save ``fig`` as ``path.<fmt>`` for each format (folders are created).

    Returns:
        The written paths.

    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        target = path.with_suffix(f".{fmt}")
        fig.savefig(target, dpi=200)
        written.append(target)
    return written


__all__ = [
    "PANEL_HEIGHT",
    "PANEL_WIDTH",
    "compare_spectra",
    "directional_snr",
    "eigenvalue_index",
    "new_figure",
    "save_figure",
    "spectrum_figure",
    "spectrum_histogram",
]
