"""The capture stage alone: which modules, their calls, BatchNorm statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from utils import report_close

from lowrank_ggn.core.engine.batchnorm import FreezeSwitch, batch_norm_layers
from lowrank_ggn.core.engine.capture import capture, captured_layers

D = torch.float64


@pytest.mark.parametrize(
    "bn, shape",
    [
        (nn.BatchNorm1d(3), (6, 3)),
        (nn.BatchNorm1d(3), (6, 3, 4)),
        (nn.BatchNorm2d(3), (5, 3, 4, 4)),
        (nn.BatchNorm3d(3, affine=False), (4, 3, 2, 2, 2)),
        (nn.BatchNorm2d(3).eval(), (5, 3, 4, 4)),
        (nn.BatchNorm2d(3, track_running_stats=False).eval(), (5, 3, 4, 4)),
    ],
)
def test_recomputed_batchnorm_equals_the_module(bn, shape):
    """Same output as the module, and the frozen backward is ``γ r δ`` per sample."""
    torch.manual_seed(0)
    bn = bn.double()
    if bn.running_mean is not None:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(shape, dtype=D, requires_grad=True)
    expected = bn(x.detach().clone())
    layers = batch_norm_layers(bn, {id(p) for p in bn.parameters()})
    switch = FreezeSwitch()
    with capture([], layers, switch):
        y = bn(x)
    report_close(y, expected, rtol=1e-12, name="recomputed output")
    rec = layers[0]
    assert rec.batch_stats == (bn.training or bn.running_mean is None)
    delta = torch.randn_like(y)
    with switch.freeze():
        (frozen,) = torch.autograd.grad(y, x, delta, retain_graph=True)
    view = [1, -1] + [1] * (x.dim() - 2)
    scale = (rec.gamma * rec.inv_std.detach()).view(view)
    report_close(frozen, scale * delta, rtol=1e-12, name="frozen backward")
    (true,) = torch.autograd.grad(y, x, delta)
    if rec.batch_stats:  # the statistics add the BatchNorm correction
        assert (true - frozen).abs().max() > 1e-6
    else:
        report_close(true, frozen, rtol=1e-12, name="running statistics")


def test_capture_leaves_no_hook_behind():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    layers = batch_norm_layers(model, set())
    with capture([], layers, FreezeSwitch()):
        model(torch.randn(5, 3, dtype=D))
    assert all(not m._forward_hooks for m in model.modules())


def test_layer_called_with_keywords_is_captured():
    """Forward hooks see keyword arguments too (``fc(input=x)``)."""

    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(input=x)

    model = Keyword().double()
    (layer,) = captured_layers(model, {id(p) for p in model.parameters()})
    x = torch.randn(4, 3, dtype=D)
    with capture([layer], []):
        model(x)
    assert layer.prepare(4)
    assert torch.equal(layer.operand.A[:, 0, 0], x)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(
    "module, capturable",
    [
        (nn.Embedding(5, 2, max_norm=1.0), False),  # renormalises W in place
        (nn.Embedding(5, 2, scale_grad_by_freq=True), False),
        (nn.EmbeddingBag(5, 2, mode="max"), False),
        (nn.EmbeddingBag(5, 2, mode="sum"), True),
        (nn.LayerNorm(3, elementwise_affine=False), False),  # no parameters
        (nn.ConvTranspose2d(2, 2, 3, groups=2), True),
        (nn.Conv3d(2, 2, 1, padding_mode="circular"), True),
    ],
)
def test_which_modules_are_captured(module, capturable):
    layers = captured_layers(module, {id(p) for p in module.parameters()})
    assert bool(layers) is capturable


def test_attention_out_proj_is_never_called_so_stays_generic():
    """``nn.MultiheadAttention`` reads ``out_proj.weight`` without calling it."""
    mha = nn.MultiheadAttention(4, 2, batch_first=True).double()
    (layer,) = captured_layers(mha, {id(p) for p in mha.parameters()})
    assert layer.name == "out_proj"
    x = torch.randn(3, 2, 4, dtype=D)
    with capture([layer], []):
        mha(x, x, x)
    assert not layer.prepare(3)  # no call recorded: generic
