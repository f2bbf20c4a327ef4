r"""ResNet-18 as torchvision defines it, for the BatchNorm benchmarks (no torchvision).

He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
https://arxiv.org/abs/1512.03385; the module tree, layer hyperparameters and weight
initialisation follow ``torchvision.models.resnet.resnet18`` (torchvision 0.x,
``weights=None``, ``zero_init_residual=False``, ``groups=1``, ``width_per_group=64``):

* stem: ``Conv2d(3, 64, 7, stride=2, padding=3, bias=False)``, ``BatchNorm2d(64)``,
  ``ReLU``, ``MaxPool2d(3, stride=2, padding=1)``;
* ``layer1`` … ``layer4``: two :class:`BasicBlock` each, 64/128/256/512 channels; the
  first block of ``layer2`` … ``layer4`` has stride 2 and a ``1×1`` conv (stride 2, no
  bias) + ``BatchNorm2d`` shortcut (``downsample``);
* ``BasicBlock``: ``3×3`` conv (no bias), BN, ReLU, ``3×3`` conv (no bias), BN,
  ``+ identity``, ReLU;
* head: ``AdaptiveAvgPool2d((1, 1))``, flatten, ``Linear(512, num_classes)``;
* init: ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` for every conv, BN
  weight 1 and bias 0, ``Linear`` keeps PyTorch's default.

The parameter names are torchvision's (``conv1.weight``, ``layer2.0.downsample.1.bias``,
``fc.weight``, …), so a torchvision state dict loads into this model unchanged.

Verified here (torchvision is not installed; the reference numbers are torchvision's
published ones): ``resnet18(num_classes=1000)`` has 11,689,512 parameters, the number
torchvision documents for ``ResNet18_Weights.IMAGENET1K_V1`` ("num_params"); with
``num_classes=10`` it has 11,181,642 (= 11,689,512 − 513·990). There are 20 BatchNorm
layers with ``Σ_l K_l = 4800`` channels (``Σ_l 2 K_l = 9600`` BN parameters), 21
convolutions (none with a bias) and one ``Linear``. A CIFAR-shaped input
``[N, 3, 32, 32]`` leaves ``[N, 512, 1, 1]`` before the pooling, ``[N, 10]`` at the end.

The ReLUs are in place and the residual sum is ``out += identity``, exactly as in
torchvision; ``inplace=False`` builds the same function with out-of-place ReLUs and sum.
"""

from __future__ import annotations

from torch import Tensor, nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """``3×3`` convolution with padding 1 and no bias (torchvision's ``conv3x3``)."""
    return nn.Conv2d(
        in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """``1×1`` convolution with no bias (torchvision's ``conv1x1``)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        inplace: bool = True,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        """``[N, inplanes, H, W] -> [N, planes, H / stride, W / stride]``."""
        # same call order as torchvision (hooks see the modules in that order)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        if self.inplace:
            out += identity  # torchvision's in-place residual sum
        else:
            out = out + identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ``ResNet`` restricted to :class:`BasicBlock` (ResNet-18/34)."""

    def __init__(
        self, layers: list[int], num_classes: int = 1000, inplace: bool = True
    ) -> None:
        super().__init__()
        self.inplanes = 64
        self.inplace = inplace
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=inplace)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * BasicBlock.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            # shortcut: 1x1 conv (stride 2) + BN, [N, in, H, W] -> [N, planes, H/2, W/2]
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * BasicBlock.expansion, stride),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [
            BasicBlock(self.inplanes, planes, stride, downsample, inplace=self.inplace)
        ]
        self.inplanes = planes * BasicBlock.expansion
        layers += [
            BasicBlock(self.inplanes, planes, inplace=self.inplace)
            for _ in range(1, blocks)
        ]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``[N, 3, H, W] -> [N, num_classes]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        # global average pool: [N, 512, h, w] -> [N, 512, 1, 1] -> [N, 512]
        return self.fc(self.avgpool(x).flatten(1))


def resnet18(num_classes: int = 10, inplace: bool = True) -> nn.Module:
    """ResNet-18 (torchvision's definition and initialisation), in train mode.

    Args:
        num_classes: Output size of the final ``Linear``.
        inplace: ``True`` (torchvision's choice) for in-place ReLUs and residual sum;
            ``False`` for the same function computed out of place.

    Returns:
        The model; seed the global RNG before calling for reproducible weights.

    >>> model = resnet18(num_classes=1000)
    >>> assert sum(p.numel() for p in model.parameters()) == 11_689_512
    >>> assert bn_channel_count(model) == 4800
    """
    return ResNet([2, 2, 2, 2], num_classes=num_classes, inplace=inplace)


def bn_channel_count(model: nn.Module) -> int:
    """``Σ_l K_l``: the channels of all BatchNorm layers (each has ``2 K_l`` params).

    >>> assert bn_channel_count(resnet18()) == 4800
    """
    return sum(
        m.num_features
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    )
