"""Models as people write them, for the shared case list (``tests/cases.py``).

Each builder takes a seed and returns ``(model, loss_func, inputs, targets)`` in
float64, where ``inputs`` may be a tuple (passed positionally) or a dict (passed as
keywords) and may hold integer token ids and boolean masks:

* a token transformer classifier, ``model(tokens, padding_mask)``;
* a keyword-input model, ``model(**{"features": …, "extra": …, "table": …,
  "scale": …})`` with a shared tensor and a Python float;
* an LSTM language model with cross-entropy over positions;
* a depthwise-separable (MobileNet-style) CNN, also with train-mode BatchNorm;
* a transposed-convolution decoder;
* an ``EmbeddingBag`` model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

DTYPE = torch.float64


class TokenTransformer(nn.Module):
    """Embedding, a Transformer encoder with padding mask, masked mean pool, head."""

    def __init__(self, vocab: int = 11, d: int = 8, heads: int = 2, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        layer = nn.TransformerEncoderLayer(
            d, heads, dim_feedforward=12, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: Tensor, padding_mask: Tensor) -> Tensor:
        h = self.encoder(self.embed(tokens), src_key_padding_mask=padding_mask)
        keep = (~padding_mask).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


class KeywordNet(nn.Module):
    """Called with keywords only: two batched tensors, a shared tensor, a float."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(4, 6)
        self.lin2 = nn.Linear(6 + 2, 3)

    def forward(
        self,
        *,
        features: Tensor,
        extra: Tensor,
        table: Tensor | None = None,
        scale: float = 1.0,
    ) -> Tensor:
        h = torch.tanh(self.lin1(features))
        if table is not None:
            h = h + table
        return scale * self.lin2(torch.cat([h, extra], dim=-1))


class LSTMLanguageModel(nn.Module):
    """Next-token logits ``[N, V, T]`` from an embedding, an LSTM and a head."""

    def __init__(self, vocab: int = 7, d: int = 4, hidden: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        h, _ = self.lstm(self.embed(tokens))
        return self.head(h).transpose(1, 2)


def depthwise_cnn(batch_norm: bool = False) -> nn.Module:
    """Depthwise 3×3 (groups = channels), pointwise 1×1, pool, head (MobileNet)."""
    norm = [nn.BatchNorm2d(4)] if batch_norm else []
    return nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(2, 4, 1),
        *norm,
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


class Decoder(nn.Module):
    """Latent code to a ``1×6×6`` image: Linear, reshape, transposed convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2 * 3 * 3)
        self.deconv = nn.ConvTranspose2d(2, 1, 3, stride=2, padding=1, output_padding=1)

    def forward(self, z: Tensor) -> Tensor:
        return self.deconv(torch.tanh(self.fc(z)).reshape(-1, 2, 3, 3))


class BagOfWords(nn.Module):
    """``EmbeddingBag`` (mean over each row of token ids), then a linear head."""

    def __init__(self, vocab: int = 9, d: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, d, mode="mean")
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.bag(tokens)))


def _seeded(seed: int, build) -> tuple[nn.Module, torch.Generator]:
    torch.manual_seed(seed)
    return build().to(DTYPE), torch.Generator().manual_seed(seed + 1)


def token_transformer(seed: int, N: int = 5, T: int = 6):
    model, gen = _seeded(seed, TokenTransformer)
    tokens = torch.randint(1, 11, (N, T), generator=gen)
    lengths = torch.randint(2, T + 1, (N,), generator=gen)
    mask = torch.arange(T).unsqueeze(0) >= lengths.unsqueeze(1)  # True: padding
    tokens = tokens.masked_fill(mask, 0)
    y = torch.randint(0, 3, (N,), generator=gen)
    return model, nn.CrossEntropyLoss(), (tokens, mask), y


def keyword_model(seed: int, N: int = 5):
    model, gen = _seeded(seed, KeywordNet)
    inputs = {
        "features": torch.randn(N, 4, generator=gen, dtype=DTYPE),
        "extra": torch.randn(N, 2, generator=gen, dtype=DTYPE),
        "table": torch.randn(6, generator=gen, dtype=DTYPE),  # shared: dim 0 is 6
        "scale": 0.7,
    }
    y = torch.randint(0, 3, (N,), generator=gen)
    return model, nn.CrossEntropyLoss(), inputs, y


def lstm_language_model(seed: int, N: int = 4, T: int = 5):
    model, gen = _seeded(seed, LSTMLanguageModel)
    tokens = torch.randint(0, 7, (N, T + 1), generator=gen)
    return model, nn.CrossEntropyLoss(), tokens[:, :-1], tokens[:, 1:]


def depthwise(seed: int, batch_norm: bool = False, N: int = 5):
    model, gen = _seeded(seed, lambda: depthwise_cnn(batch_norm))
    X = torch.randn(N, 2, 5, 5, generator=gen, dtype=DTYPE)
    return model, nn.CrossEntropyLoss(), X, torch.randint(0, 3, (N,), generator=gen)


def decoder(seed: int, N: int = 4):
    model, gen = _seeded(seed, Decoder)
    z = torch.randn(N, 3, generator=gen, dtype=DTYPE)
    return model, nn.MSELoss(), z, torch.randn(N, 1, 6, 6, generator=gen, dtype=DTYPE)


def bag_of_words(seed: int, N: int = 5, L: int = 4):
    model, gen = _seeded(seed, BagOfWords)
    tokens = torch.randint(0, 9, (N, L), generator=gen)
    return model, nn.CrossEntropyLoss(), tokens, torch.randint(0, 3, (N,), generator=gen)


def _mlp(seed: int, N: int, k_out: int):
    model, gen = _seeded(
        seed, lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, k_out))
    )
    return model, gen, torch.randn(N, 4, generator=gen, dtype=DTYPE)


def huber(seed: int, N: int = 6):
    """``HuberLoss(delta=0.5)``: some residuals inside the quadratic zone, some out."""
    model, gen, X = _mlp(seed, N, 3)
    y = torch.randn(N, 3, generator=gen, dtype=DTYPE)
    return model, nn.HuberLoss(delta=0.5), X, y


def gaussian_nll(seed: int, N: int = 6):
    """``GaussianNLLLoss`` with per-sample variances: targets ``(y, var)``."""
    model, gen, X = _mlp(seed, N, 2)
    y = torch.randn(N, 2, generator=gen, dtype=DTYPE)
    var = torch.rand(N, 2, generator=gen, dtype=DTYPE) + 0.5
    return model, nn.GaussianNLLLoss(), X, (y, var)


def softplus_sum(out: Tensor, y: Tensor) -> Tensor:
    """A plain function: ``Σ_n Σ_k softplus(F_nk − y_nk)`` (sum over samples)."""
    return nn.functional.softplus(out - y).sum()


#: what lowrank_ggn must find numerically (a function has no ``reduction``)
softplus_sum.expected_reduction = "sum"


def callable_loss(seed: int, N: int = 5):
    """A plain Python function as the loss (ρ = 1 found numerically)."""
    model, gen, X = _mlp(seed, N, 3)
    return model, softplus_sum, X, torch.randn(N, 3, generator=gen, dtype=DTYPE)
