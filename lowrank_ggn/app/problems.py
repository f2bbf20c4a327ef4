r"""The problems ``lowrank-ggn`` analyses, and how the options select parts of them.

A :class:`Problem` is one model, loss and batch: a zoo model trained on the digits
(:func:`zoo_problem`) or what the user's ``--setup MODULE:FUNCTION`` returns
(:func:`setup_problem`). :func:`subsampling_indices` turns ``--subsampling`` into batch
positions; ``--per-layer`` splits a model with :func:`lowrank_ggn.per_layer_groups`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lowrank_ggn.app.models import build_model
from lowrank_ggn.app.training import (
    DEFAULT_TRAIN_STEPS,
    LEARNING_RATE,
    MOMENTUM,
    TRAIN_BATCH,
    digits_targets,
    make_loss,
    train,
)


@dataclass
class Problem:
    """One model, loss and batch to analyse."""

    name: str
    model: nn.Module
    loss_func: nn.Module
    inputs: Tensor
    targets: Tensor
    origin: str
    training: dict[str, Any] = field(default_factory=dict)


def zoo_problem(name: str, args: argparse.Namespace) -> Problem:
    """Zoo model ``name`` (seeded), trained ``--train-steps``, and a digits batch."""
    from lowrank_ggn.app.data import digits_batch

    dtype = getattr(torch, args.dtype or "float64")
    device = args.device or "cpu"
    steps = DEFAULT_TRAIN_STEPS if args.train_steps is None else args.train_steps
    model = build_model(name, args.seed, dtype, device)
    training = (
        train(model, args.loss, steps, args.seed, dtype, device, f"training {name}")
        if steps
        else {"steps": 0}
    )
    X, labels = digits_batch(args.batch_size, args.seed, dtype, device)
    origin = (
        f"trained for {steps} SGD steps (lr {LEARNING_RATE}, momentum {MOMENTUM}, "
        f"batch {TRAIN_BATCH}), last mini-batch loss {training['final_minibatch_loss']:.3g}"
        if steps
        else "at initialisation (no training)"
    )
    return Problem(
        name,
        model,
        make_loss(args.loss),
        X,
        digits_targets(labels, args.loss, dtype),
        origin,
        training,
    )


def setup_problem(spec: str, args: argparse.Namespace) -> Problem:
    """Call the user's ``MODULE:FUNCTION`` and check what it returns."""
    module_name, _, func_name = spec.partition(":")
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise SystemExit(
            f"lowrank-ggn: --setup: cannot import module {module_name!r} ({err}); "
            "run from its folder or add that folder to PYTHONPATH."
        ) from err
    finally:
        sys.path.pop(0)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise SystemExit(
            f"lowrank-ggn: --setup: module {module_name!r} has no function {func_name!r}."
        )
    returned = func()
    ok = (
        isinstance(returned, tuple | list)
        and len(returned) == 3
        and isinstance(returned[0], nn.Module)
        and isinstance(returned[2], tuple | list)
        and len(returned[2]) == 2
    )
    if not ok:
        raise SystemExit(
            f"lowrank-ggn: --setup: {spec}() must return (model, loss_func, "
            f"(inputs, targets)); got {type(returned).__name__}."
        )
    model, loss_func, (X, y) = returned
    if args.dtype is not None:
        dtype = getattr(torch, args.dtype)
        model = model.to(dtype=dtype)
        X = X.to(dtype) if X.is_floating_point() else X
        y = y.to(dtype) if y.is_floating_point() else y
    if args.device is not None:
        model, X, y = model.to(args.device), X.to(args.device), y.to(args.device)
    return Problem(spec, model, loss_func, X, y, f"from --setup {spec}")


def subsampling_indices(
    spec: str | None, batch_size: int, seed: int
) -> list[int] | None:
    """``None``, ``K`` random positions (seeded) or the listed positions."""
    if spec is None:
        return None
    text = spec.strip()
    try:
        if "," in text:
            idx = [int(s) for s in text.split(",") if s.strip()]
        else:
            k = int(text)
            if not 1 <= k <= batch_size:
                raise SystemExit(
                    f"lowrank-ggn: --subsampling {k} must lie in [1, {batch_size}] "
                    "(the batch size)."
                )
            gen = torch.Generator().manual_seed(seed)
            idx = sorted(torch.randperm(batch_size, generator=gen)[:k].tolist())
    except ValueError as err:
        raise SystemExit(
            f"lowrank-ggn: --subsampling must be an integer or a comma-separated "
            f"list of batch positions; got {spec!r}."
        ) from err
    bad = [i for i in idx if not 0 <= i < batch_size]
    if bad or not idx:
        raise SystemExit(
            f"lowrank-ggn: --subsampling positions must lie in [0, {batch_size}); got {spec!r}."
        )
    return idx


__all__ = [
    "Problem",
    "setup_problem",
    "subsampling_indices",
    "zoo_problem",
]
