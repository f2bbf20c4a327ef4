"""Bad set-ups for ``tests/test_validation.py``: parameters, losses, dtypes and
devices, models that cannot be linearised (entries as in :data:`bad_inputs.BAD_DATA`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from bad_inputs import F64, NIE, TE, VE, A, B, MergesBatch, ReturnsTuple, _with
from torch import nn

#: (id, builder, error, message regex, stage): bad set-ups.
BAD_SETUPS = [
    # params
    (
        "params-foreign",
        _with(params=lambda p: [nn.Linear(2, 2).weight]),
        VE,
        "params\\[0\\] .* is not a parameter of model",
        B,
    ),
    (
        "params-frozen",
        _with(params=lambda p: [p["model"][0].weight.requires_grad_(False)]),
        VE,
        r"params\[0\] \(0.weight\) has requires_grad=False; drop it",
        B,
    ),
    (
        "params-duplicate",
        _with(params=lambda p: [p["model"][0].weight, p["model"][0].weight]),
        VE,
        r"params\[1\] \(0.weight\) appears twice",
        B,
    ),
    (
        "params-non-tensor",
        _with(params=lambda p: [p["model"][0].weight, 3]),
        TE,
        r"params\[1\] is a int, not a torch.nn.Parameter",
        B,
    ),
    (
        "params-single-tensor",
        _with(params=lambda p: p["model"][0].weight),
        TE,
        "wrap it: params=\\[p\\]",
        B,
    ),
    ("params-empty", _with(params=lambda p: []), VE, "params is empty", B),
    (
        "params-dict",
        _with(params=lambda p: dict(p["model"].named_parameters())),
        TE,
        "params must be a sequence of parameters",
        B,
    ),
    (
        "no-trainable-parameter",
        _with(model=lambda p: p["model"].requires_grad_(False)),
        VE,
        "no parameter with requires_grad=True",
        B,
    ),
    # losses: any callable with a scalar, per-sample-plus-reduction loss
    (
        "loss-not-callable",
        _with(loss=lambda p: "cross_entropy"),
        TE,
        "loss_func must be callable",
        B,
    ),
    (
        "reduction-none",
        _with(loss=lambda p: nn.CrossEntropyLoss(reduction="none")),
        NIE,
        "reduction='none' is not supported",
        B,
    ),
    (
        "ce-class-weights",
        _with(loss=lambda p: nn.CrossEntropyLoss(weight=torch.ones(3, dtype=F64))),
        NIE,
        r"weight=...\) with reduction='mean' is not supported",
        B,
    ),
    (
        "loss-couples-samples",
        _with(loss=lambda p: lambda o, t: F.cross_entropy(o, t) * o.mean()),
        VE,
        "is not a per-sample loss plus reduction",
        A,
    ),
    (
        "loss-not-convex",
        _with(loss=lambda p: lambda o, t: -F.cross_entropy(o, t)),
        VE,
        "not positive semi-definite",
        A,
    ),
    # dtypes and devices
    (
        "inputs-float32",
        _with(X=lambda p: p["X"].float()),
        VE,
        r"inputs have dtype torch.float32 .* convert with inputs.to\(torch.float64\)",
        B,
    ),
    (
        "model-half",
        _with(model=lambda p: p["model"].half()),
        NIE,
        "lowrank_ggn computes in float32 or float64",
        B,
    ),
    (
        "mixed-dtype-parameters",
        _with(model=lambda p: (p["model"][3].float(), p["model"])[1]),
        VE,
        "differ in dtype or device",
        B,
    ),
    (
        "inputs-on-meta",
        _with(X=lambda p: p["X"].to("meta")),
        VE,
        "inputs are on meta but the model parameters on cpu",
        B,
    ),
    (
        "targets-on-meta",
        _with(y=lambda p: p["y"].to("meta")),
        VE,
        "targets are on meta but the model parameters on cpu",
        B,
    ),
    # models that cannot be linearised
    (
        "model-returns-tuple",
        _with(model=lambda p: ReturnsTuple()),
        VE,
        "its tensor fields are 0, 1. Pass output=",
        A,
    ),
    (
        "model-merges-batch",
        _with(model=lambda p: MergesBatch(4, 3, dtype=F64)),
        VE,
        "it must keep the batch in dim 0",
        A,
    ),
    (
        "active-dropout",
        _with(
            case="mlp-ce-mean",
            model=lambda p: nn.Sequential(p["model"], nn.Dropout(0.5)),
        ),
        VE,
        "model is not deterministic",
        A,
    ),
    (
        "model-without-parameters",
        _with(model=lambda p: nn.Softmax(dim=1)),
        VE,
        "model has no parameters",
        B,
    ),
]
