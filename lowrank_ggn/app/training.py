r"""The training loop of the command line and the experiments: zoo models on digits.

:func:`train` runs ``steps`` steps of SGD (learning rate :data:`LEARNING_RATE`,
momentum :data:`MOMENTUM`, mini-batches of :data:`TRAIN_BATCH` samples) on
scikit-learn's 8×8 digits (:func:`lowrank_ggn.app.data.digits_batches`), updating the
model's parameters in place. The mini-batches come from epochs reshuffled by a
generator seeded with ``seed``, so the same model, seed, dtype and device give the same
run; the model's initialisation is seeded by whoever builds it
(:func:`lowrank_ggn.app.models.build_model`). The loss is :func:`make_loss`:
``CrossEntropyLoss`` on the labels (``"ce"``) or ``MSELoss`` on one-hot labels
(``"mse"``, :func:`digits_targets`), both with reduction ``"mean"``. It returns the
settings and the loss of the last mini-batch, for the report and the experiments'
JSON; the gradients are cleared at the end.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from torch import Tensor, nn

from lowrank_ggn.app.models import NUM_CLASSES

#: SGD steps of the default run of ``lowrank-ggn`` before the spectrum is computed.
DEFAULT_TRAIN_STEPS = 150
#: Learning rate and momentum of that SGD, and its mini-batch size.
LEARNING_RATE, MOMENTUM, TRAIN_BATCH = 0.05, 0.9, 64


def make_loss(loss: str) -> nn.Module:
    """``CrossEntropyLoss()`` for ``"ce"``, ``MSELoss()`` for ``"mse"`` (mean)."""
    return nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss()


def digits_targets(labels: Tensor, loss: str, dtype: torch.dtype) -> Tensor:
    """Labels for CE, one-hot ``[N, 10]`` in ``dtype`` for MSE."""
    if loss == "ce":
        return labels
    return nn.functional.one_hot(labels, NUM_CLASSES).to(dtype)


def train(
    model: nn.Module,
    loss: str,
    steps: int,
    seed: int,
    dtype: torch.dtype,
    device: str | torch.device,
    desc: str = "training",
) -> dict[str, Any]:
    """``steps`` SGD steps on the digits (reshuffled epochs, seeded), in place.

    Returns:
        Settings and the loss of the last mini-batch, for the report.

    """
    from tqdm import tqdm

    from lowrank_ggn.app.data import digits_batches

    loss_func = make_loss(loss)
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    last = math.nan
    batches = digits_batches(TRAIN_BATCH, steps, seed, dtype, device)
    for X, y in tqdm(
        batches, total=steps, desc=desc, file=sys.stderr, leave=False, disable=None
    ):
        opt.zero_grad(set_to_none=True)
        value = loss_func(model(X), digits_targets(y, loss, dtype))
        value.backward()
        opt.step()
        last = value.item()
    model.zero_grad(set_to_none=True)
    return {
        "steps": steps,
        "optimizer": "SGD",
        "lr": LEARNING_RATE,
        "momentum": MOMENTUM,
        "batch_size": TRAIN_BATCH,
        "final_minibatch_loss": last,
    }


__all__ = [
    "DEFAULT_TRAIN_STEPS",
    "LEARNING_RATE",
    "MOMENTUM",
    "TRAIN_BATCH",
    "digits_targets",
    "make_loss",
    "train",
]
