"""The training problems of the optimiser experiments, seeded and float32.

* ``digits-cnn`` / ``digits-cnn-bn``: the zoo's ``cnn`` and ``cnn-bn`` (BatchNorm in
  train mode) on a fixed 80/20 split of the 1,797 digits, cross-entropy.
* ``teacher-student``: MLP regression, ``16 → 64 → 64 → 4`` (tanh), D = 5,508, MSE;
  the targets are a teacher MLP of the same shape (its own seed, weights ×3 so that
  its outputs have variance 1.4) plus Gaussian noise of standard deviation 0.1 (a loss
  floor of 0.01 against 1.5 at the start) on 2,048 training and 512 test inputs
  ``x ~ N(0, I)``.
* ``synthetic-bn-cnn``: a train-mode BatchNorm CNN (two conv-BN-ReLU-pool blocks, 8 and
  16 channels, then a linear layer; D = 1,946) on 8×8 images of 10 classes: a fixed
  random prototype per class plus noise of standard deviation 2 (2,048 training, 512
  test images), cross-entropy.

The training loss of a problem is the loss of the whole training split with the model
in the modes it trains in (train-mode BatchNorm normalises with the split's own
statistics), so no optimiser depends on running statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowrank_ggn.app.data import load_digits
from lowrank_ggn.app.models import build_model

DTYPE = torch.float32
DATA_SEED = 1234
TEACHER_SCALE = 3.0


@dataclass
class Problem:
    """A training problem: model builder, loss, data splits, classification or not."""

    name: str
    label: str
    build: Callable[[int], nn.Module]
    loss_func: nn.Module
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    classification: bool


def _mlp(seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4)
    )
    with torch.no_grad():  # default init, drawn from this seed alone
        for layer in model[::2]:
            bound = 1 / layer.in_features**0.5
            layer.weight.uniform_(-bound, bound, generator=gen)
            layer.bias.uniform_(-bound, bound, generator=gen)
    return model.to(DTYPE)


def _bn_cnn(seed: int) -> nn.Module:
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 10),
    ).to(DTYPE)
    torch.random.set_rng_state(state)
    return model


def _generated(
    name: str,
    label: str,
    build: Callable[[int], nn.Module],
    loss_func: nn.Module,
    X: Tensor,
    y: Tensor,
    n_train: int,
) -> Problem:
    """A problem on generated data: the first ``n_train`` samples train, the rest
    test; a classification where the targets are class indices (integers)."""
    train, test = (X[:n_train], y[:n_train]), (X[n_train:], y[n_train:])
    classification = not y.is_floating_point()
    return Problem(name, label, build, loss_func, train, test, classification)


def teacher_student(n_train: int = 2048, n_test: int = 512) -> Problem:
    gen = torch.Generator().manual_seed(DATA_SEED)
    teacher = _mlp(DATA_SEED + 1)
    with torch.no_grad():
        for layer in teacher[::2]:
            layer.weight.mul_(TEACHER_SCALE)
    X = torch.randn(n_train + n_test, 16, generator=gen, dtype=DTYPE)
    with torch.no_grad():
        y = teacher(X) + 0.1 * torch.randn(X.shape[0], 4, generator=gen, dtype=DTYPE)
    label = "teacher-student MLP (MSE)"
    return _generated("teacher-student", label, _mlp, nn.MSELoss(), X, y, n_train)


def synthetic_bn_cnn(n_train: int = 2048, n_test: int = 512) -> Problem:
    gen = torch.Generator().manual_seed(DATA_SEED + 2)
    prototypes = torch.randn(10, 1, 8, 8, generator=gen, dtype=DTYPE)
    y = torch.randint(0, 10, (n_train + n_test,), generator=gen)
    noise = torch.randn(y.numel(), 1, 8, 8, generator=gen, dtype=DTYPE)
    X = prototypes[y] + 2.0 * noise
    label = "BN CNN (train mode), synthetic 8×8"
    return _generated(
        "synthetic-bn-cnn", label, _bn_cnn, nn.CrossEntropyLoss(), X, y, n_train
    )


def digits(model_name: str, test_fraction: float = 0.2) -> Problem:
    images, labels = load_digits(DTYPE)
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    n_test = round(test_fraction * images.shape[0])
    test, train = perm[:n_test], perm[n_test:]
    return Problem(
        f"digits-{model_name}",
        f"digits, {model_name}" + (" (train mode)" if "bn" in model_name else ""),
        lambda seed: build_model(model_name, seed, DTYPE),
        nn.CrossEntropyLoss(),
        (images[train], labels[train]),
        (images[test], labels[test]),
        classification=True,
    )


PROBLEMS: dict[str, Callable[[], Problem]] = {
    "digits-cnn": lambda: digits("cnn"),
    "digits-cnn-bn": lambda: digits("cnn-bn"),
    "teacher-student": teacher_student,
    "synthetic-bn-cnn": synthetic_bn_cnn,
}


def batches(data: tuple[Tensor, Tensor], size: int, seed: int) -> Iterator[tuple]:
    """Reshuffled epochs (the last incomplete batch dropped)."""
    X, y = data
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(X.shape[0], generator=gen)
        for start in range(0, X.shape[0] - size + 1, size):
            idx = perm[start : start + size]
            yield X[idx], y[idx]


@torch.no_grad()
def evaluate(problem: Problem, model: nn.Module, split: str) -> dict:
    """Loss (and error rate) of a whole split, in the model's training modes."""
    X, y = getattr(problem, split)
    out = model(X)
    result = {"loss": float(problem.loss_func(out, y))}
    if problem.classification:
        result["error"] = float((out.argmax(1) != y).double().mean())
    return result
