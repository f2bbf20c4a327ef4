r"""The benchmarks' own networks: DeepOBS' 3c3d with or without BatchNorm, the tiny
smoke-test nets, an MLP, and CIFAR-10-shaped batches.

* 3c3d (DeepOBS, https://arxiv.org/abs/1903.05499): three blocks ``Conv2d`` (64, 96,
  128 channels; kernels 5, 3, 3; padding 0, 0, 1), optional ``BatchNorm2d``, ``ReLU``,
  ``MaxPool2d(3, stride=2, padding=1)``, then ``Linear(1152, 512)``, ``ReLU``,
  ``Linear(512, 256)``, ``ReLU``, ``Linear(256, 10)``: D = 895,210 without
  BatchNorm, on ``[N, 3, 32, 32]``.
* ``tiny``: ``Conv2d(3, 4, 3)``, ``BatchNorm2d(4)``, ``ReLU``, ``Flatten``,
  ``Linear(144, 3)`` on ``[N, 3, 8, 8]``, C = 3; ``tiny-plain``: the same with the
  identity in place of the BatchNorm.
* ``mlp``: ``[N, 3, 32, 32]`` flattened, two hidden layers of 512, C = 10.

``running_stats=False`` builds BatchNorm with ``track_running_stats=False``: the same
train-mode function, which curvlinops' ``torch.func`` transforms need.
"""

from __future__ import annotations

#: Names of :func:`build`'s models with train-mode BatchNorm.
BN_MODELS = {"3c3d-bn", "tiny"}
MODELS = ("3c3d", "3c3d-bn", "tiny", "tiny-plain", "mlp")


def dense_layers(*widths: int) -> list:
    """``Linear`` maps through ``widths`` with ``ReLU`` between them (none at the end)."""
    from torch import nn

    layers: list[nn.Module] = []
    for cin, cout in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(cin, cout), nn.ReLU()]
    return layers[:-1]


def three_c_three_d(batch_norm: bool, running_stats: bool = True):
    """DeepOBS' 3c3d for ``[N, 3, 32, 32]`` → 10 (BatchNorm after each conv
    optional), initialised from torch's global generator, train mode."""
    from torch import nn

    def block(cin: int, cout: int, k: int, pad: int) -> list[nn.Module]:
        norm = [nn.BatchNorm2d(cout, track_running_stats=running_stats)]
        return [
            nn.Conv2d(cin, cout, k, padding=pad),
            *(norm if batch_norm else []),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        ]

    return nn.Sequential(
        *block(3, 64, 5, 0),
        *block(64, 96, 3, 0),
        *block(96, 128, 3, 1),
        nn.Flatten(),
        *dense_layers(1152, 512, 256, 10),
    )


def build(
    model_name: str, N: int, device: str = "cpu", seed: int = 0, running_stats=True
):
    """Model (train mode), ``CrossEntropyLoss``, inputs and targets of a model of
    :data:`MODELS` for ``N`` samples; weights and batch from ``manual_seed(seed)``."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    if model_name in ("tiny", "tiny-plain"):
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4, track_running_stats=running_stats),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 6 * 6, 3),
        )
        if model_name == "tiny-plain":
            model[1] = nn.Identity()
        X, C = torch.randn(N, 3, 8, 8), 3
    elif model_name == "mlp":
        model = nn.Sequential(nn.Flatten(), *dense_layers(3072, 512, 512, 10))
        gen = torch.Generator().manual_seed(N)
        X = torch.randn(N, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (N,), generator=gen)
        return model.to(device).train(), nn.CrossEntropyLoss(), X.to(device), y
    elif model_name in ("3c3d", "3c3d-bn"):
        model = three_c_three_d(model_name == "3c3d-bn", running_stats)
        X, C = torch.randn(N, 3, 32, 32), 10
    else:
        raise ValueError(f"unknown model {model_name!r}; choose from {MODELS}")
    y = torch.randint(0, C, (N,))
    model = model.to(device).train()
    return model, nn.CrossEntropyLoss(), X.to(device), y.to(device)


def num_classes(model_name: str) -> int:
    """``C`` of a model of :func:`build`."""
    return 3 if model_name.startswith("tiny") else 10
