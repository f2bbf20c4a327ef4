"""Minimal re-creations of what timm, transformers and torchvision models do.

For the shared case list (``tests/cases.py``); each builder takes a seed and returns
``(model, loss_func, inputs, targets)`` in float64. The real libraries' models run in
``tests/test_zoo.py`` when the libraries are installed.

* :class:`BatchNormAct2d`: a ``BatchNorm2d`` subclass whose own ``forward`` calls
  ``F.batch_norm`` and then its activation (timm's fused norm + activation), in
  train and eval mode;
* in-place activations right after captured layers (``ReLU(inplace=True)`` after a
  convolution, a BatchNorm and a ``Linear``: torchvision's and timm's ResNets);
* :class:`AddmmConv1D`: ``torch.addmm(b, x, W)`` with a weight stored as
  ``[in, out]`` (Hugging Face GPT-2's ``Conv1D``);
* :class:`TiedLM`: the output projection reuses the token embedding's weight
  (tied input/output embeddings), with a ``ModelOutput``-like return value;
* a flattening language-model loss,
  ``F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))``;
* a 0-dim parameter (CLIP's ``logit_scale``, NFNet's ``skipinit_gain``);
* :class:`ConvNeXtish`: timm's ``LayerNorm2d`` (``F.layer_norm`` between permutes),
  a layer scale ``x * gamma.reshape(1, -1, 1, 1)``, a learned position table added
  by broadcasting, and a T5-style RMS norm ``weight * x / rms(x)``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DTYPE = torch.float64


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d whose ``forward`` also applies its activation (as in timm)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        training = self.training or self.running_mean is None
        x = F.batch_norm(
            x,
            self.running_mean
            if not self.training or self.track_running_stats
            else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            training,
            0.1,
            self.eps,
        )
        return self.act(x)


def fused_bn_act_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3),
        BatchNormAct2d(3),
        nn.Conv2d(3, 3, 1),
        BatchNormAct2d(3),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    )


class InplaceBlock(nn.Module):
    """A residual block with in-place ReLUs after a BatchNorm and after the sum."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


def inplace_resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(inplace=True),  # right after a captured convolution
        InplaceBlock(3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 4),
        nn.ReLU(inplace=True),  # right after a captured Linear
        nn.Linear(4, 3),
    )


class AddmmConv1D(nn.Module):
    """``y = x W + b`` by ``torch.addmm`` on the flattened positions (GPT-2's Conv1D)."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(
            shape
        )


class ModelOutput(OrderedDict):
    """A dict with attribute access, as ``transformers.utils.ModelOutput``."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err


class TiedLM(nn.Module):
    """Token embedding, ``Conv1D`` MLP, output projection tied to the embedding.

    Returns ``ModelOutput(logits=[N, T, V], hidden_states=[N, T, d])``.
    """

    def __init__(self, vocab: int = 7, d: int = 4) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(8, d)
        self.mlp = AddmmConv1D(d, 6)
        self.proj = AddmmConv1D(6, d)
        self.ln = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def forward(self, tokens: Tensor) -> ModelOutput:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.wte(tokens) + self.wpe(pos)
        h = h + self.proj(F.gelu(self.mlp(h)))
        h = self.ln(h)
        return ModelOutput(logits=self.lm_head(h), hidden_states=h)


def flat_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Language-model CE written the usual way: flattened positions, mean."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


class ScaledHead(nn.Module):
    """A Linear head times a learned 0-dim scale (``logit_scale``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)
        self.logit_scale = nn.Parameter(torch.tensor(1.3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x))) * self.logit_scale.exp()


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of ``[N, C, H, W]`` (timm's): permute, normalise, back."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class T5Norm(nn.Module):
    """RMS norm without mean subtraction, scale only (T5's ``T5LayerNorm``)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))

    def forward(self, x: Tensor) -> Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + 1e-6))


class ConvNeXtish(nn.Module):
    """Stem, LayerNorm2d, depthwise conv with layer scale, position table, T5 norm."""

    def __init__(self, c: int = 3, size: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, c, 3, padding=1)
        self.norm = LayerNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.gamma = nn.Parameter(0.5 + torch.rand(c))
        self.pos = nn.Parameter(0.1 * torch.randn(1, c, size, size))
        self.t5 = T5Norm(c * size * size)
        self.head = nn.Linear(c * size * size, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.stem(x))
        x = x + self.dw(x) * self.gamma.reshape(1, -1, 1, 1)
        x = x + self.pos
        return self.head(self.t5(x.flatten(1)))


def _seeded(seed: int, build) -> tuple[nn.Module, torch.Generator]:
    torch.manual_seed(seed)
    return build().to(DTYPE), torch.Generator().manual_seed(seed + 1)


def _images(build, seed: int, N: int, train: bool, size: int = 6):
    model, gen = _seeded(seed, build)
    for m in model.modules():  # non-trivial running statistics for eval mode
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
    model.train(train)
    X = torch.randn(N, 2, size, size, generator=gen, dtype=DTYPE)
    return model, nn.CrossEntropyLoss(), X, torch.randint(0, 3, (N,), generator=gen)


def fused_bn_act(seed: int, train: bool = True, N: int = 5):
    return _images(fused_bn_act_cnn, seed, N, train)


def inplace_relu(seed: int, train: bool = False, N: int = 5):
    return _images(inplace_resnet, seed, N, train, size=4)


def tied_lm(seed: int, N: int = 3, T: int = 4):
    """Tied embeddings, ``Conv1D`` layers, a ``ModelOutput``, a flattening LM loss."""
    model, gen = _seeded(seed, TiedLM)
    tokens = torch.randint(0, 7, (N, T + 1), generator=gen)
    return model, flat_lm_loss, tokens[:, :-1], tokens[:, 1:]


def convnextish(seed: int, N: int = 5):
    model, gen = _seeded(seed, ConvNeXtish)
    X = torch.randn(N, 2, 4, 4, generator=gen, dtype=DTYPE)
    return model, nn.CrossEntropyLoss(), X, torch.randint(0, 3, (N,), generator=gen)


def zero_dim_param(seed: int, N: int = 5):
    model, gen = _seeded(seed, ScaledHead)
    X = torch.randn(N, 4, generator=gen, dtype=DTYPE)
    return model, nn.CrossEntropyLoss(), X, torch.randint(0, 3, (N,), generator=gen)


#: what lowrank_ggn must find numerically (a function has no ``reduction``)
flat_lm_loss.expected_reduction = "mean"


class CachedBias(nn.Module):
    """An attention-bias table cached in eval mode (timm's LeViT ``Attention``)."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(3, d)
        self.attention_biases = nn.Parameter(0.3 * torch.randn(d))
        self.attention_bias_cache: dict[str, Tensor] = {}
        self.head = nn.Linear(d, 3)

    def biases(self, device: torch.device) -> Tensor:
        if self.training:
            return self.attention_biases * 2.0
        key = str(device)
        if key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.attention_biases * 2.0
        return self.attention_bias_cache[key]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.proj(x) + self.biases(x.device)))
