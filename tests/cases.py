"""Shared model/loss/data cases: every feature is tested over this whole list.

Each case is a small constructor with a fixed seed that returns
``(model, loss_func, inputs, targets)`` in float64; ``inputs`` is a tensor, a tuple
or a dict (the real-model cases of ``tests/real_models.py``). ``mixing`` says whether the
forward pass mixes samples (BatchNorm with batch statistics), i.e. which engine path
is expected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import real_models
import torch
import zoo_patterns
from torch import Tensor, nn

DTYPE = torch.float64


@dataclass(frozen=True)
class Case:
    """A named test problem."""

    name: str
    build: Callable[[], tuple[nn.Module, nn.Module, Tensor, Tensor]]
    mixing: bool

    def make(self) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
        """Build the problem (deterministic)."""
        return self.build()

    def __repr__(self) -> str:
        return self.name


class Residual(nn.Module):
    """``x + conv(bn(relu(conv(x))))``, a residual block with BatchNorm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.bn(torch.relu(self.conv1(x))))


def _targets(
    loss: nn.Module, out_shape: tuple[int, ...], gen: torch.Generator
) -> Tensor:
    if isinstance(loss, nn.CrossEntropyLoss):
        N, K, *pos = out_shape
        return torch.randint(0, K, (N, *pos), generator=gen)
    if isinstance(loss, nn.BCEWithLogitsLoss):
        return torch.rand(out_shape, generator=gen, dtype=DTYPE)
    return torch.randn(out_shape, generator=gen, dtype=DTYPE)


def _problem(
    seed: int,
    model_fn: Callable[[], nn.Module],
    in_shape: tuple[int, ...],
    loss: nn.Module,
    train: bool = True,
) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = model_fn().to(DTYPE)
    if not train:
        model.eval()  # otherwise as built (a builder may set modes per module)
    gen = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(in_shape, generator=gen, dtype=DTYPE)
    with torch.no_grad():
        # run a copy so the original's BN running stats stay at their init
        import copy

        out_shape = tuple(copy.deepcopy(model)(X).shape)
    # non-trivial running statistics for eval-mode BN
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.running_mean is not None:
                m.running_mean.normal_(0, 0.3, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5, generator=gen)
                m.bias.data.normal_(0, 0.3, generator=gen)
    return model, loss, X, _targets(loss, out_shape, gen)


def mlp(k_out: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, k_out))


def mlp_bn(k_out: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, k_out)
    )


def _conv_net(*middle: nn.Module) -> nn.Module:
    """``Conv2d(2, 3, 3)``, the ``middle`` layers, a Linear head:
    ``[N, 2, 6, 6] -> [N, 3]`` (the middle layers halve the ``[4, 4]`` maps)."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), *middle, nn.Flatten(), nn.Linear(3 * 2 * 2, 3)
    )


def cnn() -> nn.Module:
    return _conv_net(nn.ReLU(), nn.MaxPool2d(2))


def cnn_bn(**bn_kwargs) -> nn.Module:
    """BatchNorm2d (options ``bn_kwargs``) after the convolution, average pooling."""
    return _conv_net(nn.BatchNorm2d(3, **bn_kwargs), nn.ReLU(), nn.AvgPool2d(2))


def resnet_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        Residual(2),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 3),
    )


def layernorm_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.ReLU(), nn.Linear(5, 3))


def groupnorm_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 2),
    )


def segmentation() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 1))


def sequence_mlp() -> nn.Module:
    """A Linear layer shared over 5 sequence positions (weight sharing), then a head."""
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5, 2))


class Transpose(nn.Module):
    """Swap dims 1 and 2 (sequence-major <-> channel-major)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


class MixLast(nn.Module):
    """Adds half of sample ``N - 2`` to sample ``N - 1``: only the last sample reads
    another one, so chunks of the batch without it look sample-local."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x[:-1], x[-1:] + 0.5 * x[-2:-1]])


class TwoBranches(nn.Module):
    """One BatchNorm output read by two heads: ``head1(relu(h)) + head2(tanh(h))``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.head1 = nn.Linear(5, 3)
        self.head2 = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(self.fc(x))
        return self.head1(torch.relu(h)) + self.head2(torch.tanh(h))


def bn1d_sequence() -> nn.Module:
    """BatchNorm1d on ``[N, K, L]``: a Linear over 5 positions, normalised per channel."""
    return nn.Sequential(
        nn.Linear(3, 4),
        Transpose(),
        nn.BatchNorm1d(4),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 5, 3),
    )


def bn3d_stacked() -> nn.Module:
    """BatchNorm3d on the input, then Linear, BatchNorm1d twice (stacked), head."""
    return nn.Sequential(
        nn.BatchNorm3d(2),
        nn.Flatten(),
        nn.Linear(2 * 2 * 3 * 3, 4),
        nn.BatchNorm1d(4),
        nn.BatchNorm1d(4),
        nn.ReLU(),
        nn.Linear(4, 3),
    )


def mixed_train_eval_bn() -> nn.Module:
    """Two BatchNorm layers: the first in train mode, the second in eval mode."""
    model = nn.Sequential(
        nn.Linear(4, 5),
        nn.BatchNorm1d(5),
        nn.ReLU(),
        nn.Linear(5, 4),
        nn.BatchNorm1d(4),
        nn.Tanh(),
        nn.Linear(4, 3),
    )
    model[4].eval()
    return model


CE, MSE, BCE = nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss
#: ``[N, C, H, W]`` of the :func:`cnn` and :func:`cnn_bn` cases.
IMAGES = (5, 2, 6, 6)


def _case(name, seed, model_fn, in_shape, loss, train=True, mixing=False) -> Case:
    return Case(name, lambda: _problem(seed, model_fn, in_shape, loss, train), mixing)


def _bn2d_flavour(name, seed, loss, train=True, **bn_kwargs) -> Case:
    """:func:`cnn_bn` on :data:`IMAGES` with BatchNorm2d options (``affine``,
    ``momentum``, …); it mixes samples, in eval mode too where BatchNorm keeps no
    running statistics."""
    return _case(
        name, seed, partial(cnn_bn, **bn_kwargs), IMAGES, loss, train, mixing=True
    )


CASES: list[Case] = [
    _case("mlp-ce-mean", 0, mlp, (6, 4), CE()),
    _case("mlp-ce-sum", 1, mlp, (6, 4), CE(reduction="sum")),
    _case("mlp-mse-mean", 2, mlp, (6, 4), MSE()),
    _case("mlp-mse-sum", 3, mlp, (6, 4), MSE(reduction="sum")),
    _case("mlp-bce-mean", 4, mlp, (6, 4), BCE()),
    _case("mlp-bce-sum", 5, mlp, (6, 4), BCE(reduction="sum")),
    _case("mlp-mse-C1", 6, lambda: mlp(1), (5, 4), MSE()),
    _case("mlp-bce-C1", 7, lambda: mlp(1), (5, 4), BCE(reduction="sum")),
    _case("mlp-ce-N1", 8, mlp, (1, 4), CE()),
    _case("cnn-pool-ce", 9, cnn, IMAGES, CE()),
    _case("bn1d-train-ce", 10, mlp_bn, (6, 4), CE(), mixing=True),
    _case("bn1d-train-mse-sum", 11, mlp_bn, (6, 4), MSE(reduction="sum"), mixing=True),
    _case("bn1d-train-bce", 12, mlp_bn, (6, 4), BCE(), mixing=True),
    _case("bn1d-eval-ce", 13, mlp_bn, (6, 4), CE(), train=False),
    _case("bn2d-train-ce", 14, cnn_bn, IMAGES, CE(), mixing=True),
    _case("bn2d-eval-ce", 15, cnn_bn, IMAGES, CE(), train=False),
    _case("resnet-bn-train-ce", 16, resnet_bn, (4, 1, 4, 4), CE(), mixing=True),
    _case("layernorm-ce", 17, layernorm_net, (6, 4), CE()),
    _case("groupnorm-mse", 18, groupnorm_cnn, (4, 2, 6, 6), MSE()),
    _case("segmentation-ce-mean", 19, segmentation, (3, 2, 3, 3), CE()),
    _case("segmentation-ce-sum", 20, segmentation, (3, 2, 3, 3), CE(reduction="sum")),
    _case("sequence-linear-mse", 21, sequence_mlp, (4, 5, 3), MSE()),
]

#: Models as people write them (``tests/real_models.py``): tuple and dict inputs,
#: token ids and masks, LSTM, attention, depthwise and transposed convolutions; and
#: losses without closed-form factors (tuple targets, a plain function).
CASES += [
    Case("transformer-mask-ce", lambda: real_models.token_transformer(40), False),
    Case("keyword-inputs-ce", lambda: real_models.keyword_model(41), False),
    Case("lstm-lm-ce", lambda: real_models.lstm_language_model(42), False),
    Case("depthwise-ce", lambda: real_models.depthwise(43), False),
    Case("depthwise-bn-train-ce", lambda: real_models.depthwise(44, True), True),
    Case("deconv-decoder-mse", lambda: real_models.decoder(45), False),
    Case("embedding-bag-ce", lambda: real_models.bag_of_words(46), False),
    # losses without a closed form: autodiff factors (tuple targets, a function)
    Case("mlp-huber", lambda: real_models.huber(47), False),
    Case("mlp-gaussian-nll", lambda: real_models.gaussian_nll(48), False),
    Case("mlp-callable-sum", lambda: real_models.callable_loss(49), False),
]

#: What timm, transformers and torchvision models do (``tests/zoo_patterns.py``): a
#: BatchNorm subclass with its own forward (norm + activation), in-place ReLUs after
#: captured layers, ``addmm`` with a transposed weight, tied embeddings with a
#: ``ModelOutput``-like return value and a flattening LM loss, a 0-dim parameter,
#: normalisations and broadcast parameters applied by functional calls.
CASES += [
    Case("fused-bn-act-train-ce", lambda: zoo_patterns.fused_bn_act(50), True),
    Case("fused-bn-act-eval-ce", lambda: zoo_patterns.fused_bn_act(51, False), False),
    Case("inplace-relu-eval-ce", lambda: zoo_patterns.inplace_relu(52), False),
    Case("inplace-relu-train-ce", lambda: zoo_patterns.inplace_relu(53, True), True),
    # seed and size with λ_min/λ_max ≈ 6e-5: eigenvectors of eigenvalues near
    # 1e-10·λ_max carry errors of eps·λ_max/λ, beyond the shared tolerances
    Case("tied-conv1d-lm", lambda: zoo_patterns.tied_lm(60, N=2), False),
    Case("zero-dim-param-ce", lambda: zoo_patterns.zero_dim_param(55), False),
    Case("convnextish-ce", lambda: zoo_patterns.convnextish(56), False),
]

#: Cases with an operator that has no double backward (``EmbeddingBag``): their
#: ``J e_k`` come from the rows of the batch Jacobian, ``N·O`` backward passes.
JACOBIAN_ROW_CASES = {"embedding-bag-ce"}

CASE_IDS = [c.name for c in CASES]
MIXING_CASES = [c for c in CASES if c.mixing]
#: Normalisations that do not mix samples: eval-mode BatchNorm, LayerNorm, GroupNorm.
NON_MIXING_NORM_CASES = [
    c
    for c in CASES
    if c.name in ("bn1d-eval-ce", "bn2d-eval-ce", "layernorm-ce", "groupnorm-mse")
]

#: Every BatchNorm flavour the engine's strategies must handle exactly;
#: all mix samples. Each runs through every strategy in ``test_engine_strategies``.
BN_CASES: list[Case] = [
    *[c for c in CASES if c.mixing],
    _case("bn1d-seq-train-ce", 30, bn1d_sequence, (6, 5, 3), CE(), mixing=True),
    _case(
        "bn3d-stacked-train-mse", 31, bn3d_stacked, (6, 2, 2, 3, 3), MSE(), mixing=True
    ),
    _bn2d_flavour("bn2d-noaffine-train-ce", 32, CE(), affine=False),
    _bn2d_flavour(
        "bn2d-nostats-eval-ce", 33, CE(), train=False, track_running_stats=False
    ),
    _bn2d_flavour("bn2d-momentum-none-train-bce", 34, BCE(), momentum=None),
    _case("bn-two-branches-ce", 35, TwoBranches, (6, 4), CE(), mixing=True),
    _case("bn-mixed-train-eval-ce", 36, mixed_train_eval_bn, (6, 4), CE(), mixing=True),
]
BN_CASE_IDS = [c.name for c in BN_CASES]
