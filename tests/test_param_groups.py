"""Per-group (block-diagonal) spectra against diagonal blocks of the dense GGN."""

from __future__ import annotations

import pytest
import torch
from cases import CASES
from utils import (
    RTOL,
    assert_spectrum_matches,
    assert_state_equal,
    report_close,
    state_of,
)

from lowrank_ggn import (
    GGN,
    block_gram_matrices,
    ggn_block_spectra,
    per_layer_groups,
)
from lowrank_ggn.reference import dense_ggn


def test_per_layer_spectra_match_dense_diagonal_blocks(case):
    model, loss, X, y = case.make()
    groups = per_layer_groups(model)
    before = state_of(model)
    results = ggn_block_spectra(model, loss, X, y, groups, eigenvectors=True)
    assert_state_equal(before, model)
    assert len(results) == len(groups)
    for group, res in zip(groups, results):
        G = dense_ggn(model, loss, X, y, params=group["params"])
        assert_spectrum_matches(res.eigenvalues, G)
        E, lam = res.eigenvectors, res.eigenvalues
        assert E.shape == (lam.numel(), G.shape[0]), group["name"]
        if lam.numel():
            residual = (G @ E.T - E.T * lam).norm(dim=0)
            assert residual.max() <= RTOL * lam[0], group["name"]
        report_close(res.eigenvalues.sum(), G.trace(), name=f"trace {group['name']}")


def test_custom_groups_are_diagonal_blocks_of_the_full_ggn():
    model, loss, X, y = next(c for c in CASES if c.name == "bn1d-train-ce").make()
    a = [model[3].weight, model[0].bias]
    b = [model[1].weight]
    G = dense_ggn(model, loss, X, y, params=a + b)
    da = sum(p.numel() for p in a)
    groups = [{"params": a}, {"params": b[0]}]
    results = ggn_block_spectra(model, loss, X, y, groups, top_k=3)
    grams = block_gram_matrices(model, loss, X, y, groups)
    report_close(grams[0].trace() + grams[1].trace(), G.trace(), name="Gram traces")
    dense_a = torch.linalg.eigvalsh(G[:da, :da]).flip(0)[:3]
    dense_b = torch.linalg.eigvalsh(G[da:, da:]).flip(0)[: results[1].rank]
    report_close(results[0].eigenvalues, dense_a, name="block a")
    report_close(results[1].eigenvalues, dense_b, name="block b")


def test_per_layer_groups_names_and_sharing():
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3)
    )
    model.add_module("tied", model[2])  # same module twice: its params once
    model[0].bias.requires_grad_(False)
    groups = per_layer_groups(model)
    assert [g["name"] for g in groups] == ["0", "2"]
    assert groups[0]["params"] == [model[0].weight]
    assert len(groups[1]["params"]) == 2


@pytest.mark.parametrize(
    ("groups", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "empty"),
        ([{"params": []}], {}, ValueError, "empty"),
        ({"params": []}, {}, TypeError, "list of dicts"),
        (["x"], {}, TypeError, "key 'params'"),
        ([{"params": [torch.zeros(2)]}], {}, ValueError, "not a parameter"),
        ("overlap", {}, ValueError, "disjoint"),
        ("one", {"params": "other"}, ValueError, "does not differentiate"),
    ],
)
def test_bad_groups_are_rejected(groups, kwargs, error, match):
    model, loss, X, y = CASES[0].make()
    one = [{"params": [model[0].weight]}]
    if isinstance(groups, str):
        groups = {"overlap": one + one, "one": one}[groups]
    if kwargs:
        kwargs = {"params": [model[2].weight]}
    ggn = GGN(model, loss, X, y, **kwargs)
    with pytest.raises(error, match=match):
        ggn.block_grams(groups)
    assert ggn.forward_passes == 0  # refused before any model call


def test_groups_of_a_subset_in_any_order():
    """Groups need not cover the GGN's parameters; eigenvectors follow group order."""
    model, loss, X, y = next(c for c in CASES if c.name == "bn1d-train-ce").make()
    a = [model[3].weight, model[0].bias]
    G = dense_ggn(model, loss, X, y, params=a)
    ggn = GGN(model, loss, X, y)
    (res,) = ggn.block_spectra([{"params": a}], eigenvectors=True)
    assert_spectrum_matches(res.eigenvalues, G)
    E, lam = res.eigenvectors, res.eigenvalues
    assert E.shape == (lam.numel(), G.shape[0])
    assert (G @ E.T - E.T * lam).norm(dim=0).max() <= RTOL * lam[0]
