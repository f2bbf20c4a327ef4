"""Plotting helpers: what they draw, labels, legends, sizes, files; pyplot untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")

from lowrank_ggn.app import plotting  # noqa: E402


def _pyplot_figures() -> list[int]:
    import matplotlib.pyplot as plt

    return plt.get_fignums()


def test_histogram_counts_every_positive_eigenvalue_on_a_log_axis():
    evals = torch.tensor([1e-6, 1e-3, 0.5, 2.0, 2.0, 0.0, -1e-12], dtype=torch.float64)
    ax = plotting.spectrum_histogram(evals, bins=10, label="exact")
    (stairs,) = ax.patches
    assert stairs.get_data().values.sum() == 5  # zero and negative values not drawn
    edges = stairs.get_data().edges
    assert edges[0] <= 1e-6 and edges[-1] >= 2.0
    np.testing.assert_allclose(np.diff(np.log10(edges)), np.log10(2e6) / 10)
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel() and ax.get_ylabel() == "count"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["exact (5)"]


def test_density_integrates_to_one_in_log10():
    spectra = {"a": np.logspace(-3, 1, 50), "b": np.logspace(-2, 0, 7)}
    ax = plotting.compare_spectra(spectra, kind="histogram", bins=12)
    for stairs in ax.patches:
        values, edges = stairs.get_data().values, stairs.get_data().edges
        np.testing.assert_allclose((values * np.diff(np.log10(edges))).sum(), 1.0)
    assert len(ax.get_legend().get_texts()) == 2


def test_eigenvalue_index_sorts_descending_and_labels():
    ax = plotting.eigenvalue_index({"x": [1.0, 3.0, 2.0], "y": np.array([5.0, 0.0])})
    (x_line, y_line) = ax.get_lines()
    np.testing.assert_array_equal(x_line.get_xdata(), [1, 2, 3])
    np.testing.assert_array_equal(x_line.get_ydata(), [3.0, 2.0, 1.0])
    np.testing.assert_array_equal(y_line.get_ydata(), [5.0])  # zero dropped
    assert ax.get_yscale() == "log" and "k" in ax.get_xlabel()
    rel = plotting.eigenvalue_index([4.0, 2.0], relative=True)
    np.testing.assert_array_equal(rel.get_lines()[0].get_ydata(), [1.0, 0.5])


def test_directional_snr_draws_the_snr_one_line():
    ax = plotting.directional_snr(
        torch.tensor([10.0, 1.0, 0.1], dtype=torch.float64), label="γ"
    )
    lines = ax.get_lines()
    np.testing.assert_array_equal(lines[0].get_ydata(), [10.0, 1.0, 0.1])
    assert any(np.all(np.asarray(line.get_ydata()) == 1.0) for line in lines[1:])
    assert "SNR" in ax.get_ylabel() and ax.get_yscale() == "log"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["γ", "SNR = 1"]


def test_figure_sizes_fit_a_paper_column_and_files_are_written(tmp_path):
    before = _pyplot_figures()
    fig = plotting.spectrum_figure({"cnn": [1.0, 0.1], "cnn-bn": [2.0, 0.2]}, title="t")
    width, height = fig.get_size_inches()
    assert width == pytest.approx(2 * plotting.PANEL_WIDTH)
    assert height == pytest.approx(plotting.PANEL_HEIGHT)
    written = plotting.save_figure(fig, tmp_path / "sub" / "spectrum")
    assert [p.name for p in written] == ["spectrum.png", "spectrum.pdf"]
    assert all(p.stat().st_size > 0 for p in written)
    assert _pyplot_figures() == before, "helpers must not create pyplot figures"


def test_draws_into_given_axes():
    fig, axes = plotting.new_figure(ncols=3)
    assert plotting.spectrum_histogram([1.0, 2.0], axes[0]) is axes[0]
    assert plotting.eigenvalue_index([1.0, 2.0], axes[1]) is axes[1]
    assert plotting.directional_snr([1.0, 2.0], axes[2]) is axes[2]
    assert len(fig.axes) == 3


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="kind must be 'index' or 'histogram'"):
        plotting.compare_spectra({"a": [1.0]}, kind="violin")
    with pytest.raises(TypeError, match="mapping"):
        plotting.compare_spectra([1.0, 2.0])


def test_empty_and_constant_spectra_still_plot():
    plotting.spectrum_histogram({"empty": [], "one": [3.0]})
    plotting.eigenvalue_index([])
