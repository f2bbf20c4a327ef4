"""``S Sᵀ`` equals the dense Hessian of the batch loss w.r.t. the outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from utils import report_close

from lowrank_ggn.core.loss_factors import loss_hessian_factors
from lowrank_ggn.reference import dense_output_hessian

D = torch.float64
REDUCTIONS = ["mean", "sum"]


def _block_diag_from_factors(S: torch.Tensor) -> torch.Tensor:
    """Block diagonal ``diag_n(Σ_c s_nc s_ncᵀ)``, ``[N·O, N·O]``."""
    per_sample = S.reshape(*S.shape[:2], -1).movedim(1, 0)  # [N, C, O]
    return torch.block_diag(*(s.T @ s for s in per_sample))


def _check(loss, out, target):
    S = loss_hessian_factors(loss, out, target)
    assert S.shape[1:] == out.shape
    report_close(
        _block_diag_from_factors(S),
        dense_output_hessian(loss, out, target),
        name="S Sᵀ",
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(5, 4), (3, 4, 2, 3), (4, 1)])
def test_cross_entropy_class_targets(reduction, shape):
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(shape, generator=gen, dtype=D) * 3
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)
    _check(nn.CrossEntropyLoss(reduction=reduction), out, target)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_probability_targets(reduction):
    gen = torch.Generator().manual_seed(1)
    out = torch.randn(4, 3, 2, generator=gen, dtype=D)
    target = torch.rand(4, 3, 2, generator=gen, dtype=D)  # unnormalised on purpose
    _check(nn.CrossEntropyLoss(reduction=reduction), out, target)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(5, 3), (4,), (3, 2, 2)])
@pytest.mark.parametrize("loss_cls", [nn.MSELoss, nn.BCEWithLogitsLoss])
def test_elementwise_losses(loss_cls, shape, reduction):
    gen = torch.Generator().manual_seed(2)
    out = torch.randn(shape, generator=gen, dtype=D) * 2
    target = torch.rand(shape, generator=gen, dtype=D)
    _check(loss_cls(reduction=reduction), out, target)


def test_bce_extreme_logits_are_finite():
    out = torch.tensor([[40.0, -40.0, 0.0]], dtype=D)
    S = loss_hessian_factors(nn.BCEWithLogitsLoss(), out, torch.zeros_like(out))
    assert torch.isfinite(S).all() and (S >= 0).all()


@pytest.mark.parametrize(
    "loss, match",
    [
        (nn.CrossEntropyLoss(reduction="none"), "reduction='none'"),
        (nn.MSELoss(reduction="none"), "reduction='none'"),
        (nn.HuberLoss(reduction="none"), "reduction='none'"),
        (nn.CrossEntropyLoss(weight=torch.ones(3, dtype=D)), "total class weight"),
        (nn.NLLLoss(weight=torch.ones(3, dtype=D)), "total class weight"),
    ],
)
def test_unsupported_losses_raise(loss, match):
    out = torch.randn(4, 3, dtype=D)
    with pytest.raises(NotImplementedError, match=match):
        loss_hessian_factors(loss, out, torch.zeros(4, dtype=torch.long))


def test_not_callable_raises():
    with pytest.raises(TypeError, match="loss_func must be callable"):
        loss_hessian_factors("mse", torch.zeros(2, 2), torch.zeros(2, 2))


@pytest.mark.parametrize(
    "target, err, match",
    [
        (torch.tensor([0, 1, 3, 0]), ValueError, r"must lie in \[0, 3\)"),
        (torch.tensor([0, 1, -1, 0]), ValueError, r"must lie in \[0, 3\)"),
        (torch.tensor([0, 1, 2]), ValueError, "batch size 3"),
        (torch.tensor([0, 1, -100, 0]), NotImplementedError, "ignore_index"),
        (torch.zeros(4, 2, dtype=torch.long), ValueError, "must have shape"),
        (torch.zeros(4, dtype=torch.bool), TypeError, "integer dtype"),
    ],
)
def test_bad_ce_targets_raise(target, err, match):
    with pytest.raises(err, match=match):
        loss_hessian_factors(nn.CrossEntropyLoss(), torch.randn(4, 3, dtype=D), target)


def test_mse_shape_mismatch_raises():
    with pytest.raises(ValueError, match="Broadcasting is not supported"):
        loss_hessian_factors(
            nn.MSELoss(), torch.randn(4, 3, dtype=D), torch.randn(4, 1, dtype=D)
        )
