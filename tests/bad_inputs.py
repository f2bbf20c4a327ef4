"""Bad inputs for ``tests/test_validation.py``: builders and the bad-data table.

Each builder returns ``(model, loss_func, X, y, params)`` from a shared case with one
thing broken; :data:`BAD_DATA` (targets, loss Hessians, non-finite values, empty
batches) and :data:`bad_setups.BAD_SETUPS` (parameters, losses, dtypes and devices,
models) are the entries ``(id, builder, error, message regex, stage)``.
"""

from __future__ import annotations

import math

import torch
from cases import CASES
from torch import nn

F64 = torch.float64


def _make(name: str = "bn1d-train-ce"):
    model, loss, X, y = next(c for c in CASES if c.name == name).make()
    return model, loss, X, y, None


# --- builders of bad inputs: each returns (model, loss_func, X, y, params) --------


def _with(**changes):
    case = changes.pop("case", "bn1d-train-ce")

    def build():
        model, loss, X, y, params = _make(case)
        parts = {"model": model, "loss": loss, "X": X, "y": y, "params": params}
        for key, fn in changes.items():
            parts[key] = fn(parts)
        return parts["model"], parts["loss"], parts["X"], parts["y"], parts["params"]

    return build


def _set(t: torch.Tensor, index, value) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def _poison(module_fn, name, value):
    def fn(parts):
        with torch.no_grad():
            getattr(module_fn(parts["model"]), name).view(-1)[0] = value
        return parts["model"]

    return fn


class ReturnsTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3, dtype=F64)

    def forward(self, x):
        return self.lin(x), x


class MergesBatch(nn.Linear):
    def forward(self, x):
        return super().forward(x).reshape(1, -1)


def _mse(name="mlp-mse-mean", **changes):
    return _with(case=name, **changes)


B, A = "before_forward", "before_backward"
VE, TE, NIE = ValueError, TypeError, NotImplementedError

#: (id, builder, error, message regex, stage): bad data (targets, loss Hessians,
#: non-finite values, empty batches).
BAD_DATA = [
    # targets that do not fit: batch size, shape, dtype, range
    (
        "targets-batch-size",
        _with(y=lambda p: p["y"][:-1]),
        VE,
        "targets have batch size 5 but (inputs have 6|the model outputs have)",
        B,
    ),
    (
        "targets-scalar",
        _with(y=lambda p: p["y"][0]),
        VE,
        "targets have batch size none",
        B,
    ),
    (
        "targets-list",
        _with(y=lambda p: p["y"].tolist()),
        TE,
        "targets must be a torch.Tensor",
        B,
    ),
    (
        "ce-targets-shape",
        _with(y=lambda p: p["y"][:, None]),
        VE,
        r"class-index targets must have shape \(6,\)",
        A,
    ),
    (
        "ce-probability-targets-shape",
        _with(y=lambda p: torch.rand(6, 4, dtype=F64)),
        VE,
        "probability targets needs targets of the output shape",
        A,
    ),
    (
        "ce-targets-float32",
        _with(y=lambda p: torch.rand(6, 3)),
        VE,
        "targets have dtype torch.float32 but the model parameters torch.float64",
        B,
    ),
    (
        "ce-targets-int8",
        _with(y=lambda p: p["y"].to(torch.int8)),
        TE,
        "class indices \\(integer dtype\\)",
        A,
    ),
    (
        "mse-targets-broadcast",
        _mse(y=lambda p: p["y"][:, :1]),
        VE,
        "Broadcasting is not supported",
        A,
    ),
    (
        "mse-targets-integer",
        _mse(y=lambda p: p["y"].long()),
        TE,
        "targets must be floating point",
        A,
    ),
    (
        "class-too-large",
        _with(y=lambda p: _set(p["y"], 0, 3)),
        VE,
        r"targets must lie in \[0, 3\) .* got values in \[0, 3\]",
        A,
    ),
    (
        "class-negative",
        _with(y=lambda p: _set(p["y"], 2, -1)),
        VE,
        r"targets must lie in \[0, 3\)",
        A,
    ),
    (
        "class-ignore-index",
        _with(y=lambda p: _set(p["y"], 2, -100)),
        NIE,
        "ignore_index=-100",
        A,
    ),
    # a loss Hessian that is not PSD
    (
        "ce-negative-probabilities",
        _with(y=lambda p: _set(torch.full((6, 3), 0.5, dtype=F64), (1, 2), -0.5)),
        VE,
        "must be non-negative, else the loss Hessian is not positive semi-definite",
        A,
    ),
    # non-finite inputs, targets, parameters, outputs
    (
        "nan-inputs",
        _with(X=lambda p: _set(p["X"], (1, 2), math.nan)),
        VE,
        "inputs contain NaN or Inf",
        B,
    ),
    (
        "inf-inputs",
        _with(X=lambda p: _set(p["X"], (0, 0), -math.inf)),
        VE,
        "inputs contain NaN or Inf",
        B,
    ),
    (
        "nan-targets",
        _mse(y=lambda p: _set(p["y"], (0, 1), math.nan)),
        VE,
        "targets contain NaN or Inf",
        B,
    ),
    (
        "nan-parameter",
        _with(model=_poison(lambda m: m[0], "weight", math.nan)),
        VE,
        "parameter 0.weight contains NaN or Inf",
        B,
    ),
    (
        "inf-frozen-parameter",
        _with(
            params=lambda p: [p["model"][3].weight],
            model=_poison(lambda m: m[0], "bias", math.inf),
        ),
        VE,
        "model outputs contain NaN or Inf",
        A,
    ),
    (
        "nan-running-variance",
        _with(
            case="bn1d-eval-ce", model=_poison(lambda m: m[1], "running_var", math.nan)
        ),
        VE,
        "model outputs contain NaN or Inf",
        A,
    ),
    # empty batch, batch of one under batch statistics
    (
        "empty-batch",
        _with(X=lambda p: p["X"][:0], y=lambda p: p["y"][:0]),
        VE,
        "inputs must hold at least one sample",
        B,
    ),
    (
        "scalar-inputs",
        _with(X=lambda p: p["X"][0, 0]),
        VE,
        "inputs must hold at least one sample",
        B,
    ),
    (
        "inputs-ndarray",
        _with(X=lambda p: p["X"].numpy()),
        TE,
        "inputs must be a torch.Tensor",
        B,
    ),
    (
        "batch-of-one-bn-train",
        _with(X=lambda p: p["X"][:1], y=lambda p: p["y"][:1]),
        VE,
        "inputs hold one sample, but 1 normalize with batch statistics",
        B,
    ),
    (
        "batch-of-one-bn-without-running-stats",
        _with(
            model=lambda p: (
                nn.Sequential(
                    nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False)
                )
                .double()
                .eval()
            ),
            X=lambda p: p["X"][:1],
            y=lambda p: p["y"][:1],
        ),
        VE,
        "track_running_stats=False",
        B,
    ),
]
