"""bn_split's statistics directions that start below the convolution feeding a
BatchNorm (``lowrank_ggn.core.engine.statistics``), against the columns strategy and
the dense reference in float64.

Each model has a BatchNorm fed by a convolution whose input depends on parameters
(another BatchNorm below it), so the route's closed-form rows, its transposed
convolution of one output channel and the backward passes from the convolution's
input all run; convolutions with stride, padding, dilation, groups, a padding mode,
no bias, one and three spatial dimensions; two BatchNorm layers reading one
convolution's output; and inputs that must keep the route from ``μ``, ``r`` (a
Linear feeding BatchNorm1d, an in-place ReLU between the convolution and its
BatchNorm). Higher directions end at the output of the lowest BatchNorm where its
convolution's output and its ``γ``, ``β`` are read by it alone, and run through it
where they are read twice.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from utils import RTOL, assert_spectrum_matches, report_close

from lowrank_ggn import GGN, ggn_spectrum, gram_matrix
from lowrank_ggn.core.engine import statistics
from lowrank_ggn.reference import dense_ggn

D = torch.float64


class TwoNorms(nn.Module):
    """Two BatchNorm layers reading one convolution's output, summed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4, affine=False)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.head((self.bn_a(h) + torch.tanh(self.bn_b(h))).flatten(1))


def _strided() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False),
        nn.BatchNorm2d(6),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 3),
    )


def _pair(first: nn.Module, act: nn.Module, second: nn.Module, flat: int) -> nn.Module:
    """``first → BN → act → second → BN → Flatten → Linear(flat, 3)``, BatchNorm of
    the convolutions' dimension."""
    bn = {
        nn.Conv1d: nn.BatchNorm1d,
        nn.Conv2d: nn.BatchNorm2d,
        nn.Conv3d: nn.BatchNorm3d,
    }
    norm = bn[type(first)]
    return nn.Sequential(
        first,
        norm(first.out_channels),
        act,
        second,
        norm(second.out_channels),
        nn.Flatten(),
        nn.Linear(flat, 3),
    )


def _reflect() -> nn.Module:
    first = nn.Conv2d(2, 3, 3)
    second = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    return _pair(first, nn.ReLU(), second, 4 * 4 * 4)


def _conv1d() -> nn.Module:
    return _pair(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Conv1d(3, 4, 2, stride=2), 4 * 3)


def _conv3d() -> nn.Module:
    first, second = nn.Conv3d(1, 2, 2), nn.Conv3d(2, 3, 2, padding=1)
    return _pair(first, nn.ReLU(), second, 3 * 3 * 3 * 3)


def _wide_padding() -> nn.Module:
    """Padding wider than the kernel's reach (the transposed convolution crops) and
    a stride that leaves an input row unread (its cotangent is zero)."""
    first, second = nn.Conv2d(2, 3, 3), nn.Conv2d(3, 4, 3, stride=2, padding=3)
    return _pair(first, nn.ReLU(), second, 4 * 4 * 4)


def _conv1d_strided_dilated() -> nn.Module:
    first = nn.Conv1d(2, 3, 2)
    second = nn.Conv1d(3, 4, 3, stride=3, dilation=2, padding=1)
    return _pair(first, nn.Tanh(), second, 4 * 3)


def _three_blocks() -> nn.Module:
    """3c3d's pattern: the third BatchNorm's passes run through two lower ones."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(2, 3),
        nn.MaxPool2d(2),
        *block(3, 4),
        *block(4, 3),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 3),
    )


def _linear() -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 5),
        nn.BatchNorm1d(5),
        nn.ReLU(),
        nn.Linear(5, 4),
        nn.BatchNorm1d(4),
        nn.Linear(4, 3),
    )


def _inplace() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )


class ReadTwice(nn.Module):
    """The first convolution's output read by its BatchNorm and by a skip: the
    directions of the BatchNorm above must run through the lower one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(x)
        h = torch.relu(self.bn1(h) + 0.5 * h)
        return self.head(torch.tanh(self.bn2(self.conv2(h))).flatten(1))


class SharedAffine(ReadTwice):
    """The lowest BatchNorm's ``γ`` also scales its activations: its rows need the
    pass (a read above every BatchNorm, which no direction reaches, would not)."""

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x))) * self.bn1.weight.view(1, -1, 1, 1)
        return self.head(torch.tanh(self.bn2(self.conv2(h))).flatten(1))


def _affine_free() -> nn.Module:
    first, second = nn.Conv2d(2, 3, 3, bias=False), nn.Conv2d(3, 4, 3, padding=1)
    model = _pair(first, nn.ReLU(), second, 4 * 4 * 4)
    model[1] = nn.BatchNorm2d(3, affine=False)
    return model


#: name -> (model, input shape, whether a direction route starts below a convolution,
#: whether higher directions end at the lowest BatchNorm's output)
MODELS = {
    "strided-dilated-grouped": (_strided, (5, 2, 6, 6), True, True),
    "reflect-padding": (_reflect, (5, 2, 6, 6), True, True),
    "two-batchnorms-one-conv": (TwoNorms, (5, 2, 6, 6), True, True),
    "conv1d": (_conv1d, (5, 2, 8), True, True),
    "conv3d": (_conv3d, (4, 1, 3, 3, 3), True, True),
    "wide-padding": (_wide_padding, (5, 2, 6, 6), True, True),
    "conv1d-strided-dilated": (_conv1d_strided_dilated, (5, 2, 11), True, True),
    "three-blocks": (_three_blocks, (5, 2, 6, 6), True, True),
    "linear-batchnorm1d": (_linear, (6, 4), False, False),
    "inplace-relu-before-batchnorm": (_inplace, (5, 2, 6, 6), False, True),
    "first-conv-read-twice": (ReadTwice, (5, 2, 6, 6), True, False),
    "lowest-gamma-read-twice": (SharedAffine, (5, 2, 6, 6), True, False),
    "lowest-batchnorm-affine-free": (_affine_free, (5, 2, 6, 6), True, True),
}

#: bn_split's frozen rows of a ``γ`` read twice miss the second read: its self-check
#: fails and the call falls back to an exact route.
FALLS_BACK = {"lowest-gamma-read-twice"}


@pytest.mark.parametrize("name", list(MODELS))
def test_directions_below_the_feeding_convolution_are_exact(name, monkeypatch):
    build, shape, routed, ended = MODELS[name]
    torch.manual_seed(0)
    model = build().to(D)
    X = torch.randn(shape, dtype=D)
    y = torch.randint(0, 3, (shape[0],))
    loss = nn.CrossEntropyLoss()
    found, bottoms = [], []
    find = statistics.FeedingConv.find.__func__
    find_bottom = statistics.BottomBatchNorm.find.__func__

    def spy(cls, *args):
        route = find(cls, *args)
        found.append(route is not None and route.edge is not None)
        return route

    def spy_bottom(cls, *args):
        bottom = find_bottom(cls, *args)
        bottoms.append(bottom is not None)
        return bottom

    monkeypatch.setattr(statistics.FeedingConv, "find", classmethod(spy))
    monkeypatch.setattr(statistics.BottomBatchNorm, "find", classmethod(spy_bottom))
    split = gram_matrix(model, loss, X, y, strategy="bn_split", progress=False)
    assert any(found) == routed, found
    assert any(bottoms) == ended, bottoms
    columns = gram_matrix(model, loss, X, y, strategy="columns", progress=False)
    report_close(split, columns, rtol=RTOL, name="bn_split Gram")
    res = ggn_spectrum(model, loss, X, y, strategy="bn_split", progress=False)
    # a wrong row would fail the self-check and fall back silently to an exact route
    if name not in FALLS_BACK:
        assert res.engine_report.fallback is None, res.engine_report.fallback
        assert res.engine_report.strategy == "bn_split"
    assert_spectrum_matches(res.eigenvalues, dense_ggn(model, loss, X, y))


def _elementary(x: Tensor, w: Tensor, b: Tensor, eps: float) -> tuple[Tensor, ...]:
    """BatchNorm in train mode from elementary operations: ``y``, ``μ``, ``r``."""
    dims, view = (0, 2, 3), (1, -1, 1, 1)
    mean = x.mean(dims)
    r = torch.rsqrt(x.var(dims, unbiased=False) + eps)
    return (x - mean.view(view)) * r.view(view) * w.view(view) + b.view(view), mean, r


def test_fused_batchnorm_backward_matches_the_elementary_graph():
    """Batched cotangents (the GPU route), cotangents of ``μ``, ``r`` themselves,
    double backward and the frozen switch, against elementary operations."""
    from lowrank_ggn.core.engine.batchnorm import FreezeSwitch, _BatchNorm

    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, 4, dtype=D, requires_grad=True)
    w, b = (torch.randn(3, dtype=D, requires_grad=True) for _ in range(2))
    switch = FreezeSwitch()
    y, mean, r, _ = _BatchNorm.apply(x, w, b, 1e-5, switch)
    ref = _elementary(x, w, b, 1e-5)
    report_close(y, ref[0], rtol=1e-14, name="output")
    batched = [
        ((y,), (ref[0],), (torch.randn(4, *y.shape, dtype=D),)),
        ((mean, r), ref[1:], (torch.randn(4, 3, dtype=D), torch.randn(4, 3, dtype=D))),
    ]
    for outs, expected, cots in batched:
        kw = dict(retain_graph=True, is_grads_batched=True, allow_unused=True)
        got = torch.autograd.grad(outs, (x, w, b), cots, **kw)
        want = torch.autograd.grad(expected, (x, w, b), cots, **kw)
        for g, h in zip(got, want):
            if h is not None:
                report_close(g, h, rtol=1e-12, name="batched backward")
    delta, tangent = torch.randn_like(y), torch.randn_like(x)
    (gx,) = torch.autograd.grad(y, x, delta, create_graph=True)
    (hx,) = torch.autograd.grad(ref[0], x, delta, create_graph=True)
    got = torch.autograd.grad((gx * tangent).sum(), (x, w), retain_graph=True)
    want = torch.autograd.grad((hx * tangent).sum(), (x, w), retain_graph=True)
    for g, h in zip(got, want):
        report_close(g, h, rtol=1e-12, name="double backward")
    with switch.freeze():
        (frozen,) = torch.autograd.grad(y, x, delta)
    report_close(frozen, delta * (w * r).detach().view(1, -1, 1, 1), name="frozen")


def test_lowest_batchnorm_sums_without_the_convolution_weight_rows():
    """With the first convolution's weight unselected, ``Σ δ x̂`` comes from ``δ``
    itself (not from the weight's rows); still exact, still ending at the output."""
    torch.manual_seed(0)
    model = _three_blocks().to(D)
    X = torch.randn(5, 2, 6, 6, dtype=D)
    y = torch.randint(0, 3, (5,))
    loss = nn.CrossEntropyLoss()
    params = [p for n, p in model.named_parameters() if n != "0.weight"]
    ended = []
    find_bottom = statistics.BottomBatchNorm.find.__func__

    def spy_bottom(cls, *args):
        bottom = find_bottom(cls, *args)
        ended.append(bottom is not None and bottom.feed.layer.weight is None)
        return bottom

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(statistics.BottomBatchNorm, "find", classmethod(spy_bottom))
        kw = dict(params=params, progress=False)
        ggn = GGN(model, loss, X, y, strategy="bn_split", **kw)
        split = ggn.gram()
    assert any(ended), ended
    assert ggn.engine_report.fallback is None, ggn.engine_report.fallback
    columns = gram_matrix(model, loss, X, y, strategy="columns", **kw)
    report_close(split, columns, rtol=RTOL, name="bn_split Gram")


@pytest.mark.parametrize("params", ["all", "no-first-weight"])
def test_lowest_batchnorm_rows_from_batched_passes(params, monkeypatch):
    """The batched route (GPUs: one vmapped pass per chunk, gradients at the lowest
    BatchNorm's output buffered) gives the same Gram as the columns strategy."""
    from lowrank_ggn.core.autodiff import batched_grad
    from lowrank_ggn.core.engine import backprop

    def batched(outputs, targets, cotangents, channel_major=(), direct=None):
        return batched_grad(outputs, targets, cotangents)

    monkeypatch.setattr(backprop, "_chunk_grads", batched)
    torch.manual_seed(0)
    model = _three_blocks().to(D)
    X = torch.randn(5, 2, 6, 6, dtype=D)
    y = torch.randint(0, 3, (5,))
    loss = nn.CrossEntropyLoss()
    chosen = [
        p for n, p in model.named_parameters() if params == "all" or n != "0.weight"
    ]
    kw = dict(params=chosen, progress=False)
    ggn = GGN(model, loss, X, y, strategy="bn_split", **kw)
    split = ggn.gram()
    # a wrong row fails the self-check, which falls back silently to an exact route
    assert ggn.engine_report.fallback is None, ggn.engine_report.fallback
    columns = gram_matrix(model, loss, X, y, strategy="columns", **kw)
    report_close(split, columns, rtol=RTOL, name="bn_split Gram")
