r"""The two architectures of ``bench_models.py``: a token transformer and a MobileNet.

Not a benchmark: model constructors and batches, seeded, float32, C = 10.

* :class:`TokenTransformer`: ``nn.Embedding(1000, 64, padding_idx=0)`` plus a learned
  positional embedding, a 2-layer ``nn.TransformerEncoder`` (d_model 64, 4 heads,
  feed-forward 256, dropout 0, ``batch_first``, ``enable_nested_tensor=False``), the
  mean over the non-padded positions, ``nn.Linear(64, 10)``. Called as
  ``model(tokens, padding_mask)``: ``tokens`` ``[N, L]`` int64, ``padding_mask``
  ``[N, L]`` bool (``True`` = pad), each sample of random length in ``[8, L]``.
* :class:`MobileNetSmall`: MobileNet-v1-style CNN on ``[N, 3, 32, 32]``: a stride-2
  3×3 stem (3 → 16), BatchNorm, ReLU6, four depthwise-separable blocks (depthwise 3×3
  with ``groups = channels``, BN, ReLU6, pointwise 1×1, BN, ReLU6), global average
  pool, ``Linear(→ 10)``. BatchNorm in **eval** mode with non-trivial running
  statistics (a calibration batch's, randomly perturbed: :func:`calibrate_batchnorm`),
  as one analyses a trained MobileNet: the model is sample-independent.
* :class:`Packed`: either model behind a one-tensor ``forward`` for callers that take
  a single input tensor: ``x = cat([tokens, mask.long()], dim=1)``, ``[N, 2L]`` int64.

MobileNet: https://arxiv.org/abs/1704.04861; the Transformer encoder:
https://arxiv.org/abs/1706.03762.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

NUM_CLASSES = 10
VOCAB = 1000
PAD = 0  # token id of padding, also the embedding's padding_idx
MIN_LENGTH = 8  # shortest sample of a token batch


class TokenTransformer(nn.Module):
    """Token classifier: embedding + positions, encoder, masked mean pool, linear head.

    Args:
        d_model: Width of the embedding and encoder.
        heads: Attention heads per layer.
        layers: Encoder layers.
        ff: Width of the feed-forward block.
        seq_len: Longest sequence (size of the positional table).
        vocab: Token vocabulary (id 0 is padding).
        num_classes: Outputs ``C``.
    """

    def __init__(
        self,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        ff: int = 256,
        seq_len: int = 32,
        vocab: int = VOCAB,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model, padding_idx=PAD)
        self.pos = nn.Parameter(0.02 * torch.randn(seq_len, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=ff, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: Tensor, padding_mask: Tensor) -> Tensor:
        """Logits ``[N, C]`` of ``tokens`` ``[N, L]`` with ``padding_mask`` ``[N, L]``."""
        L = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:L]  # [N, L, d]
        h = self.encoder(h, src_key_padding_mask=padding_mask)  # [N, L, d]
        keep = (~padding_mask).unsqueeze(-1).to(h.dtype)  # [N, L, 1]
        pooled = (h * keep).sum(1) / keep.sum(1)  # mean over non-padded positions
        return self.head(pooled)


def separable(cin: int, cout: int, stride: int) -> list[nn.Module]:
    """Depthwise 3×3 (``groups = cin``) + BN + ReLU6, pointwise 1×1 + BN + ReLU6."""
    return [
        nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU6(),
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(),
    ]


class MobileNetSmall(nn.Sequential):
    """MobileNet-v1-style CNN: stride-2 stem, depthwise-separable blocks, pool, linear.

    Args:
        widths: Channels after the stem, then after each separable block.
        strides: Stride of each separable block's depthwise convolution.
        num_classes: Outputs ``C``.
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (16, 32, 64, 128, 128),
        strides: tuple[int, ...] = (1, 2, 2, 1),
        num_classes: int = NUM_CLASSES,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU6(),
        ]
        for cin, cout, stride in zip(widths[:-1], widths[1:], strides):
            layers += separable(cin, cout, stride)
        layers += [
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(widths[-1], num_classes),
        ]
        super().__init__(*layers)


def calibrate_batchnorm(
    model: nn.Module, images: Tensor, generator: torch.Generator
) -> None:
    """Running statistics of a calibration batch, randomly perturbed, as after training.

    Each BatchNorm's running mean and variance become the cumulative average over
    ``images`` (one train-mode forward pass, ``momentum=None``), the variance then
    scaled per channel by a factor in ``[0.8, 1.25]``; weight ``1 + 0.1·ε``, bias
    ``0.1·ε``. Without calibration the random-weight net shrinks the spread across
    samples layer by layer until its logits hardly depend on the input.
    """
    norms = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration pass
    model.train()
    with torch.no_grad():
        model(images)
    for m, momentum in zip(norms, momenta):
        K = m.num_features
        m.momentum = momentum
        with torch.no_grad():
            scale = 0.8 * 1.5625 ** torch.rand(K, generator=generator)
            m.running_var.mul_(scale)
            m.weight.copy_(1 + 0.1 * torch.randn(K, generator=generator))
            m.bias.copy_(0.1 * torch.randn(K, generator=generator))


class Packed(nn.Module):
    """A two-input token model behind one tensor: ``x = cat([tokens, mask.long()], 1)``.

    For callers that take a single input tensor (the previous lowrank_ggn release);
    ``x`` is ``[N, 2L]`` int64, split back into tokens and a bool mask.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        """Logits of ``model(tokens, mask)`` with ``tokens, mask = x.chunk(2, 1)``."""
        tokens, mask = x.chunk(2, dim=1)
        return self.model(tokens, mask.bool())

    @staticmethod
    def pack(tokens: Tensor, padding_mask: Tensor) -> Tensor:
        """``[N, 2L]`` int64: tokens, then the mask as 0/1."""
        return torch.cat([tokens, padding_mask.long()], dim=1)


def token_batch(
    N: int, seq_len: int, generator: torch.Generator, vocab: int = VOCAB
) -> tuple[Tensor, Tensor]:
    """Random tokens ``[N, L]`` (ids in ``[1, vocab)``, 0 where padded) and the mask.

    Each sample's length is uniform in ``[min(8, L), L]``; ``mask[n, t]`` is ``True``
    for ``t ≥ length_n``.
    """
    lo = min(MIN_LENGTH, seq_len)
    lengths = torch.randint(lo, seq_len + 1, (N,), generator=generator)
    mask = torch.arange(seq_len).unsqueeze(0) >= lengths.unsqueeze(1)  # [N, L]
    tokens = torch.randint(1, vocab, (N, seq_len), generator=generator)
    return tokens.masked_fill(mask, PAD), mask


def build(
    name: str, N: int, seed: int = 0, quick: bool = False, packed: bool = False
) -> tuple[nn.Module, nn.Module, Tensor | tuple[Tensor, Tensor], Tensor]:
    """Model, ``CrossEntropyLoss``, inputs and targets of ``transformer`` or ``mobilenet``.

    The weights depend on ``seed`` only; the batch on ``(seed, N)``. ``quick``: a
    1-layer transformer of width 16 on length 8, a MobileNet of widths up to 16 on
    ``[N, 3, 16, 16]``. ``packed``: the transformer behind :class:`Packed`, its
    inputs one ``[N, 2L]`` tensor instead of the tuple ``(tokens, mask)``.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = torch.Generator().manual_seed(1000 * seed + N)
    if name == "transformer":
        if quick:
            kw = dict(d_model=16, heads=2, layers=1, ff=32, seq_len=8, vocab=50)
        else:
            kw = dict(d_model=64, heads=4, layers=2, ff=256, seq_len=32)
        model: nn.Module = TokenTransformer(**kw)  # train mode: see the docstring
        tokens, mask = token_batch(N, kw["seq_len"], data, kw.get("vocab", VOCAB))
        inputs: Tensor | tuple[Tensor, Tensor] = (tokens, mask)
        if packed:
            model, inputs = Packed(model), Packed.pack(tokens, mask)
    elif name == "mobilenet":
        if quick:
            model = MobileNetSmall((8, 8, 16), (2, 1))
            size = 16
        else:
            model, size = MobileNetSmall(), 32
        calib = torch.randn(64, 3, size, size, generator=gen)
        calibrate_batchnorm(model, calib, gen)
        model.eval()
        inputs = torch.randn(N, 3, size, size, generator=data)
    else:
        raise ValueError(f"unknown model {name!r}; choose transformer or mobilenet")
    y = torch.randint(0, NUM_CLASSES, (N,), generator=data)
    return model, nn.CrossEntropyLoss(), inputs, y
