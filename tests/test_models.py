"""The model zoo and the digits data: shapes, seeds, sizes, and exact spectra.

Every zoo model's GGN spectrum from the engine matches the dense reference in
float64 on a small digits batch (BatchNorm in train mode included).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from utils import assert_spectrum_matches, assert_state_equal, state_of

from lowrank_ggn import ggn_spectrum
from lowrank_ggn.app.data import digits_batch, digits_batches, load_digits
from lowrank_ggn.app.models import ZOO, build_model, num_params
from lowrank_ggn.reference import dense_ggn

#: Parameter counts stated in the ``lowrank_ggn.app.models`` docstring.
SIZES = {"mlp": 2410, "cnn": 1898, "cnn-bn": 1946, "resnet-bn": 1610}
MIXING = {"mlp": False, "cnn": False, "cnn-bn": True, "resnet-bn": True}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_shapes_sizes_and_seeds(name):
    model = build_model(name, seed=3, dtype=torch.float64)
    assert model.training
    assert model(torch.zeros(2, 1, 8, 8, dtype=torch.float64)).shape == (2, 10)
    assert num_params(model) == SIZES[name]
    again = build_model(name, seed=3, dtype=torch.float64)
    other = build_model(name, seed=4, dtype=torch.float64)
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)
    assert not all(
        torch.equal(p, r) for p, r in zip(model.parameters(), other.parameters())
    )


def test_build_model_leaves_the_global_rng_alone():
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    build_model("cnn", seed=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_spectrum_matches_dense_reference(name):
    model = build_model(name, seed=0, dtype=torch.float64)
    X, y = digits_batch(4, seed=1, dtype=torch.float64)
    before = state_of(model)
    res = ggn_spectrum(model, nn.CrossEntropyLoss(), X, y)
    assert_state_equal(before, model)
    assert (res.path.name == "full_batch") == MIXING[name]
    G = dense_ggn(model, nn.CrossEntropyLoss(), X, y)
    assert_spectrum_matches(res.eigenvalues, G)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="model must be one of cnn, cnn-bn"):
        build_model("vgg")


def test_digits_are_standardised_and_labelled():
    X, y = load_digits(torch.float64)
    assert X.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert abs(X.mean().item()) < 1e-12 and abs(X.std().item() - 1) < 1e-12


def test_digits_batch_is_seeded_and_distinct():
    X, y = digits_batch(32, seed=5, dtype=torch.float32)
    assert X.dtype == torch.float32 and X.shape == (32, 1, 8, 8)
    X2, y2 = digits_batch(32, seed=5, dtype=torch.float32)
    assert torch.equal(X, X2) and torch.equal(y, y2)
    assert torch.unique(X.flatten(1), dim=0).shape[0] == 32
    assert not torch.equal(y, digits_batch(32, seed=6)[1])


def test_digits_batches_count_and_epochs():
    batches = list(digits_batches(600, 7, seed=0))
    assert len(batches) == 7  # 2 full batches per epoch of 1797, 4 epochs started
    assert all(X.shape[0] == 600 for X, _ in batches)
    first = torch.cat([y for _, y in batches[:2]])
    assert not torch.equal(first, torch.cat([y for _, y in batches[2:4]]))


@pytest.mark.parametrize("bad", [0, 1798])
def test_bad_batch_size_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"batch_size must lie in \[1, 1797\]"):
        digits_batch(bad)
    with pytest.raises(ValueError, match=r"batch_size must lie in \[1, 1797\]"):
        next(digits_batches(bad, 1))
