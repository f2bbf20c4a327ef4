r"""A small model zoo for scikit-learn's 8×8 handwritten digits (``[N, 1, 8, 8]`` → 10).

The models are deliberately small (``D`` of a few thousand parameters) so that the
exact GGN spectrum, its eigenvectors *and* the brute-force dense GGN ``[D, D]`` of a
batch of about a hundred digits fit in seconds on a laptop CPU:

======================  =======================================================  ======
name                    layers                                                   ``D``
======================  =======================================================  ======
``mlp``                 Flatten → Linear(64, 32) → ReLU → Linear(32, 10)         2,410
``cnn``                 [Conv 3×3 → ReLU → MaxPool 2]×2 → Linear(64, 10)         1,898
``cnn-bn``              as ``cnn``, BatchNorm2d after each convolution           1,946
``resnet-bn``           Conv → residual block with BN → AvgPool → Linear         1,610
======================  =======================================================  ======

:func:`build_model` returns a zoo model initialised from a ``seed``, in the requested
dtype and device, in train mode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

#: Number of classes of the digits data.
NUM_CLASSES = 10


def mlp() -> nn.Module:
    """``Flatten → Linear(64, 32) → ReLU → Linear(32, 10)``."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES)
    )


def _cnn(batch_norm: bool) -> nn.Module:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        norm = [nn.BatchNorm2d(c_out)] if batch_norm else []
        return [nn.Conv2d(c_in, c_out, 3, padding=1), *norm, nn.ReLU(), nn.MaxPool2d(2)]

    # [N, 1, 8, 8] -> [N, 8, 4, 4] -> [N, 16, 2, 2] -> [N, 64] -> [N, 10]
    return nn.Sequential(
        *block(1, 8),
        *block(8, 16),
        nn.Flatten(),
        nn.Linear(16 * 2 * 2, NUM_CLASSES),
    )


def cnn() -> nn.Module:
    """Two ``Conv 3×3 → ReLU → MaxPool 2`` blocks (8, 16 channels), then a linear head."""
    return _cnn(batch_norm=False)


def cnn_bn() -> nn.Module:
    """:func:`cnn` with ``BatchNorm2d`` after each convolution."""
    return _cnn(batch_norm=True)


class ResidualBlock(nn.Module):
    """``x + conv₂(relu(bn₂(conv₁(relu(bn₁(x))))))`` (pre-activation, BatchNorm)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """``[N, ch, H, W] -> [N, ch, H, W]``."""
        h = self.conv1(torch.relu(self.bn1(x)))
        return x + self.conv2(torch.relu(self.bn2(h)))


def resnet_bn() -> nn.Module:
    """A stem convolution, one residual block with BatchNorm, pooling, a linear head."""
    # [N, 1, 8, 8] -> [N, 8, 8, 8] -> [N, 8, 2, 2] -> [N, 32] -> [N, 10]
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        ResidualBlock(8),
        nn.AvgPool2d(4),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, NUM_CLASSES),
    )


#: Constructors by name.
ZOO: dict[str, Callable[[], nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "cnn-bn": cnn_bn,
    "resnet-bn": resnet_bn,
}


def build_model(
    name: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The zoo model ``name``, initialised with ``seed``, in train mode.

    Args:
        name: One of :data:`ZOO` (``"mlp"``, ``"cnn"``, ``"cnn-bn"``, ``"resnet-bn"``).
        seed: Seed of the parameter initialisation (the global RNG is left untouched).
        dtype: Parameter dtype.
        device: Parameter device.

    Returns:
        The model, mapping ``[N, 1, 8, 8]`` to logits ``[N, 10]``.

    Example:
        >>> model = build_model("cnn-bn", seed=0, dtype=torch.float64)
        >>> model(torch.zeros(2, 1, 8, 8, dtype=torch.float64)).shape
        torch.Size([2, 10])
        >>> assert torch.equal(
        ...     next(model.parameters()), next(build_model("cnn-bn", 0, torch.float64).parameters())
        ... )

    """
    if name not in ZOO:
        raise ValueError(
            f"model must be one of {', '.join(sorted(ZOO))}; got {name!r}."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ZOO[name]()
    return model.to(dtype=dtype, device=device).train()


def num_params(model: nn.Module) -> int:
    """``D``, the number of parameters that require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["NUM_CLASSES", "ZOO", "build_model", "num_params"]
