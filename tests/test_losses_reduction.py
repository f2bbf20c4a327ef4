"""Any per-sample loss: its reduction factor ``ρ``, checked once, and its refusals.

The loss goes through :class:`lowrank_ggn.core.losses.autodiff.AutodiffLoss` (the
cases of ``tests/test_losses.py``); a loss that is not per-sample plus a sum or mean
reduction, is not finite, or has targets that do not fit is refused with a message
that names the fix, before any backward pass.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_losses import LOSSES, CoupledMSE, D, N, SumClaimingMean, _model_problem
from torch import nn

from lowrank_ggn import ggn_spectrum
from lowrank_ggn.core.loss_factors import loss_hessian_factors, sample_weight
from lowrank_ggn.core.loss_targets import check_targets
from lowrank_ggn.core.losses import autodiff as loss_autodiff
from lowrank_ggn.core.losses.autodiff import AutodiffLoss, check_structure
from lowrank_ggn.core.losses.registry import resolve_loss


# --- the reduction factor ρ --------------------------------------------------------
def test_reduction_of_a_callable_is_determined_once():
    """Values tell 1/N from 1; a batch of one cannot, and leaves it open."""
    loss = AutodiffLoss(lambda o, y: (o - y).square().sum())
    assert not loss.reduction_known
    one = torch.randn(1, 3, dtype=D)
    check_structure(loss, one, torch.zeros_like(one))
    assert not loss.reduction_known
    out = torch.randn(N, 3, dtype=D)
    check_targets(loss, out, torch.zeros_like(out))
    assert loss.reduction == "sum" and loss.reduction_known
    mean = AutodiffLoss(lambda o, y: (o - y).square().mean())
    check_targets(mean, out, torch.zeros_like(out))
    assert mean.reduction == "mean" and mean.reduction_known


def test_structure_is_checked_once_per_batch(monkeypatch):
    """The same unmodified tensors are not checked twice; an in-place edit re-checks."""
    loss = AutodiffLoss(nn.HuberLoss())
    out, y = torch.randn(N, 3, dtype=D), torch.randn(N, 3, dtype=D)
    check_targets(loss, out, y)
    calls = []
    original = loss_autodiff._value_grad_hvp
    monkeypatch.setattr(
        loss_autodiff,
        "_value_grad_hvp",
        lambda *a: calls.append(1) or original(*a),
    )
    loss_hessian_factors(loss, out, y)
    assert not calls
    out.mul_(2.0)
    loss_hessian_factors(loss, out, y)
    assert calls


def test_resolve_is_idempotent_and_keeps_the_loss():
    huber = nn.HuberLoss(reduction="sum")
    wrapped = resolve_loss(huber)
    assert wrapped.loss is huber and resolve_loss(wrapped) is wrapped
    assert AutodiffLoss(wrapped).loss is huber
    assert wrapped.reduction == "sum" and wrapped.reduction_known
    y = (torch.zeros(2, 3, dtype=D), torch.ones(2, 3, dtype=D))
    gauss = resolve_loss(nn.GaussianNLLLoss())
    assert gauss(torch.ones(2, 3, dtype=D), y) == nn.GaussianNLLLoss()(
        torch.ones(2, 3, dtype=D), *y
    )


def test_sample_weight_needs_a_resolved_loss():
    with pytest.raises(TypeError, match="Resolve it first"):
        sample_weight(lambda o, y: o.sum(), N)


# --- refusals ----------------------------------------------------------------------
_OUT = torch.linspace(-1.0, 2.0, N * 3, dtype=D).reshape(N, 3)

REFUSED = [
    (
        "negative-curvature",
        lambda o, y: -(o**2).sum(),
        ValueError,
        "not positive semi-definite",
    ),
    (
        "cosine",
        lambda o, y: torch.cos(o).sum(),
        ValueError,
        "not positive semi-definite",
    ),
    (
        "couples-samples",
        lambda o, y: o.sum() ** 2,
        ValueError,
        "not a per-sample loss plus reduction",
    ),
    (
        "coupled-subclass",
        CoupledMSE(),
        ValueError,
        "not a per-sample loss plus reduction",
    ),
    (
        "wrong-reduction-attribute",
        SumClaimingMean(),
        ValueError,
        "ρ from its reduction='mean'",
    ),
    (
        "not-scalar",
        lambda o, y: (o - y) ** 2,
        ValueError,
        "must return a scalar tensor",
    ),
    (
        "reduction-none",
        nn.HuberLoss(reduction="none"),
        NotImplementedError,
        "reduction='none'",
    ),
    ("not-callable", 3.0, TypeError, "loss_func must be callable"),
    (
        "ce-weight-mean",
        nn.CrossEntropyLoss(weight=torch.ones(3, dtype=D), label_smoothing=0.1),
        NotImplementedError,
        "total class weight",
    ),
]


@pytest.mark.parametrize(
    "loss, error, match", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED]
)
def test_refusals(loss, error, match):
    y = (
        torch.zeros_like(_OUT)
        if not isinstance(loss, nn.CrossEntropyLoss)
        else torch.zeros(N, dtype=torch.long)
    )
    with pytest.raises(error, match=match):
        loss_hessian_factors(loss, _OUT, y)


def test_refuses_a_loss_that_is_not_finite():
    with pytest.raises(ValueError, match="not finite at these outputs"):
        loss_hessian_factors(
            nn.PoissonNLLLoss(log_input=False), -_OUT.abs() - 1, _OUT.abs()
        )


def test_refuses_tuple_targets_without_a_per_sample_entry():
    with pytest.raises(ValueError, match="no tensor entry has 5 rows"):
        loss_hessian_factors(nn.GaussianNLLLoss(), _OUT, (torch.zeros(3, dtype=D),))


def test_refuses_targets_with_ignore_index_for_wrapped_cross_entropy():
    y = torch.tensor([0, 1, -100, 2, 0])
    with pytest.raises(NotImplementedError, match="ignore_index=-100"):
        loss_hessian_factors(nn.CrossEntropyLoss(label_smoothing=0.1), _OUT, y)


def test_memory_budget_bounds_the_per_sample_hessians():
    with pytest.raises(ValueError, match=r"per-sample loss Hessians \[N=5, O=3, O=3\]"):
        loss_hessian_factors(nn.HuberLoss(), _OUT, _OUT, memory_budget=N * 9 * 8 - 1)


def test_coupling_loss_is_refused_by_the_engine_before_any_backward_pass():
    case = next(c for c in LOSSES if c.name == "huber")
    model, _, X, y = _model_problem(case)
    with pytest.raises(ValueError, match="not a per-sample loss plus reduction"):
        ggn_spectrum(model, lambda o, t: F.huber_loss(o, t) * o.mean(), X, y)
