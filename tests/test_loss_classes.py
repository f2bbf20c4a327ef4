"""One class per closed-form loss: the registry, each class's parts, one check per batch."""

from __future__ import annotations

import math

import pytest
import torch
from cases import CASES, DTYPE
from torch import nn

from lowrank_ggn import GGN, loss_hessian_factors, sampled_loss_hessian_factors
from lowrank_ggn.core import linearization, loss_factors, loss_sampling, loss_targets
from lowrank_ggn.core.loss_factors import num_factor_columns, reduction_factor
from lowrank_ggn.core.losses.base import ClosedFormLoss
from lowrank_ggn.core.losses.registry import (
    CLOSED_FORMS,
    SUPPORTED_LOSSES,
    closed_form,
    resolve_loss,
)
from lowrank_ggn.core.losses.squared_error import SquaredError

#: Factors of two routes of the same float64 problem agree to rounding.
RTOL = 1e-12


@pytest.mark.parametrize("loss_type", SUPPORTED_LOSSES, ids=lambda t: t.__name__)
def test_every_supported_loss_has_its_class(loss_type):
    form = closed_form(loss_type())
    assert isinstance(form, ClosedFormLoss) and form.module is loss_type
    assert CLOSED_FORMS[loss_type] is form


@pytest.mark.parametrize(
    "loss",
    [
        nn.CrossEntropyLoss(weight=torch.ones(3)),
        nn.CrossEntropyLoss(label_smoothing=0.1),
        nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)),
        nn.HuberLoss(),
    ],
    ids=["ce-weight", "ce-smoothing", "bce-pos-weight", "huber"],
)
def test_options_and_other_losses_have_no_closed_form(loss):
    assert closed_form(loss) is None


@pytest.mark.parametrize(
    "loss, shape, C, rho",
    [
        (nn.CrossEntropyLoss(), (4, 3, 5), 15, 1 / 20),
        (nn.MSELoss(), (4, 3, 5), 15, 1 / 60),
        (nn.BCEWithLogitsLoss(reduction="sum"), (4, 3), 3, 1.0),
    ],
    ids=["ce-positions", "mse", "bce-sum"],
)
def test_columns_and_rho_come_from_the_class(loss, shape, C, rho):
    outputs = torch.zeros(shape, dtype=DTYPE)
    assert num_factor_columns(loss, torch.Size(shape)) == C
    assert math.isclose(reduction_factor(loss, outputs), rho)


def test_a_registered_class_serves_a_new_loss_type(monkeypatch):
    """Adding a closed form is one class (here reused) and one registry entry."""

    class HalvedMSE(nn.MSELoss):
        pass

    monkeypatch.setitem(CLOSED_FORMS, HalvedMSE, SquaredError())
    out = torch.randn(4, 3, dtype=DTYPE)
    assert resolve_loss(HalvedMSE()).__class__ is HalvedMSE  # not wrapped: closed form
    S = loss_hessian_factors(HalvedMSE(), out, out)
    torch.testing.assert_close(S, loss_hessian_factors(nn.MSELoss(), out, out))
    gen = torch.Generator().manual_seed(0)
    M = sampled_loss_hessian_factors(HalvedMSE(), out, out, 2, gen)
    gen = torch.Generator().manual_seed(0)
    expected = sampled_loss_hessian_factors(nn.MSELoss(), out, out, 2, gen)
    torch.testing.assert_close(M, expected, rtol=RTOL, atol=0)


@pytest.mark.parametrize("mc_samples", [None, 2])
def test_targets_are_checked_once_per_batch(monkeypatch, mc_samples):
    calls = []
    original = loss_targets.check_targets

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    for module in (linearization, loss_factors, loss_sampling):
        monkeypatch.setattr(module, "check_targets", counted)
    model, loss, X, y = CASES[0].make()
    gen = None if mc_samples is None else torch.Generator().manual_seed(0)
    GGN(model, loss, X, y, mc_samples=mc_samples, generator=gen).gram()
    assert len(calls) == 1
