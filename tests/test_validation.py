"""Early, clear errors: every bad input raises before heavy work and loses nothing.

Each entry of :data:`BAD_INPUTS` is run through the model-taking engine functions
(:data:`public_calls.ENGINE_CALLS`): it must raise the named error with a message
that names the argument and the fix, at the stated stage (``"before_forward"``: the
model's ``forward`` never ran; ``"before_backward"``: no vector-Jacobian product
started), and leave the model bitwise as it was.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from cases import CASES
from public_calls import (
    CALL_IDS,
    ENGINE_CALLS,
    GROUPED,
    PUBLIC_CALLS,
    REPORTS_DROPOUT,
    TARGETLESS,
    assert_state_bitwise,
)
from torch import nn
from utils import RTOL, report_close, state_of

from lowrank_ggn import (
    GGN,
    NearZeroEigenvalueWarning,
    ggn_spectrum,
    gram_matrix,
    loss_hessian_factors,
)
from lowrank_ggn.core.budget import (
    DEFAULT_MEMORY_BUDGET,
    MEMORY_BUDGET_ENV,
    MemoryBudgetExceeded,
    check_memory,
    resolve_memory_budget,
)
from lowrank_ggn.core.linearization import Linearization, linearize
from lowrank_ggn.core.options import GGNOptions
from lowrank_ggn.core.spectrum import parameter_eigenvectors
from lowrank_ggn.reference import dense_ggn, dense_output_hessian

F64 = torch.float64
MODEL_CALLS = [c for c in ENGINE_CALLS if c[0] != "loss_hessian_factors"]
MODEL_IDS = [c[0] for c in MODEL_CALLS]


def _make(name: str = "bn1d-train-ce"):
    model, loss, X, y = next(c for c in CASES if c.name == name).make()
    return model, loss, X, y, None


@contextmanager
def forward_counter(model: nn.Module):
    count = [0]
    handle = model.register_forward_pre_hook(
        lambda *_: count.__setitem__(0, count[0] + 1)
    )
    try:
        yield count
    finally:
        handle.remove()


@contextmanager
def refused_before_forward(model: nn.Module, error: type[Exception], match: str):
    """The block raises ``error`` (message matching ``match``) before ``model`` runs."""
    with forward_counter(model) as forwards, pytest.raises(error, match=match):
        yield
    assert forwards[0] == 0, "the check ran only after a forward pass"


@pytest.fixture
def no_backward(monkeypatch):
    """Fail the test if the engine starts a backward pass."""

    def refuse(*args, **kwargs):
        raise AssertionError("a backward pass started before the check")

    for name in ("vjp", "factor_blocks", "apply_factors"):
        monkeypatch.setattr(Linearization, name, refuse)


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

#: (id, builder, error, message regex, stage)
BAD_INPUTS = [
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
BAD_IDS = [b[0] for b in BAD_INPUTS]


def _skip_inapplicable(name: str, bad_id: str) -> None:
    """Bad ``params`` do not apply to calls that take ``param_groups`` (whose own
    errors are tested in ``test_param_groups.py``), the audit reports dropout and a
    loss that couples samples (as a failing check), and it does not factorise the
    loss Hessian (no PSD check)."""
    params_kind = bad_id.startswith("params-") or bad_id in {
        "no-trainable-parameter",
        "model-without-parameters",
    }
    if name in GROUPED and params_kind:
        pytest.skip("parameters come as param_groups")
    if name in REPORTS_DROPOUT and bad_id == "active-dropout":
        pytest.skip("the audit reports active dropout instead of refusing it")
    if name == "audit_structure" and bad_id == "loss-not-convex":
        pytest.skip("the audit does not factorise the loss Hessian")
    if name == "audit_structure" and bad_id == "loss-couples-samples":
        pytest.skip("the audit reports the loss structure (test_structure.py)")


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=BAD_IDS)
@pytest.mark.parametrize("name,call", MODEL_CALLS, ids=MODEL_IDS)
def test_bad_input_raises_early_and_loses_nothing(name, call, bad, no_backward):
    bad_id, build, error, match, stage = bad
    _skip_inapplicable(name, bad_id)
    model, loss, X, y, params = build()
    before = state_of(model)
    with forward_counter(model) as forwards, pytest.raises(error, match=match):
        call(model, loss, X, y, params)
    assert_state_bitwise(before, model)
    if stage == "before_forward":
        assert forwards[0] == 0, "the check ran only after a forward pass"


def test_model_not_a_module():
    _, loss, X, y, _ = _make()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        gram_matrix(lambda x: x, loss, X, y)


@pytest.mark.parametrize("name,call", PUBLIC_CALLS, ids=CALL_IDS)
def test_lazy_module_raises(name, call):
    model, loss, X, y, _ = _make()
    model = nn.Sequential(nn.LazyLinear(3, dtype=F64))
    with pytest.raises(ValueError, match="uninitialized \\(lazy\\) parameters"):
        call(model, loss, X, y, None)
    assert isinstance(model[0].weight, nn.parameter.UninitializedParameter)


def test_model_on_meta_device():
    """Device mismatch without a GPU: model parameters on the meta device."""
    model, loss, X, y, _ = _make()
    model = model.to("meta")
    with pytest.raises(
        ValueError, match="inputs are on cpu but the model parameters on meta"
    ):
        ggn_spectrum(model, loss, X, y)
    assert all(p.device.type == "meta" for p in model.parameters())


# --- the same early errors through every public function --------------------


SHARED_BAD = [
    b
    for b in BAD_INPUTS
    if b[0]
    in {
        "nan-inputs",
        "empty-batch",
        "inputs-float32",
        "inputs-on-meta",
        "batch-of-one-bn-train",
        "params-foreign",
        "params-frozen",
        "params-duplicate",
        "nan-parameter",
        "class-too-large",
        "targets-batch-size",
        "model-half",
    }
]


@pytest.mark.parametrize("bad", SHARED_BAD, ids=[b[0] for b in SHARED_BAD])
@pytest.mark.parametrize("name,call", PUBLIC_CALLS, ids=CALL_IDS)
def test_every_public_function_refuses_bad_input(name, call, bad):
    bad_id, build, error, match, _ = bad
    if name in TARGETLESS and bad_id in {"class-too-large", "targets-batch-size"}:
        pytest.skip("does not read the targets")
    _skip_inapplicable(name, bad_id)
    model, loss, X, y, params = build()
    before = state_of(model)
    with pytest.raises(error, match=match):
        call(model, loss, X, y, params)
    assert_state_bitwise(before, model)


def test_reference_refuses_a_non_scalar_loss():
    model, _, X, y, _ = _make()
    loss = nn.CrossEntropyLoss(reduction="none")
    before = state_of(model)
    with pytest.raises(ValueError, match="must return a scalar tensor"):
        dense_ggn(model, loss, X, y)
    with pytest.raises(TypeError, match="loss_func must be callable"):
        dense_output_hessian(3, torch.zeros(2, 3, dtype=F64), y[:2])
    assert_state_bitwise(before, model)


@pytest.mark.parametrize(
    "outputs,targets,error,match",
    [
        (
            torch.zeros(0, 3, dtype=F64),
            torch.zeros(0, dtype=torch.long),
            ValueError,
            "outputs must hold at least one sample",
        ),
        (
            torch.tensor([[0.0, math.nan]], dtype=F64),
            torch.tensor([1]),
            ValueError,
            "outputs contain NaN or Inf",
        ),
        (
            torch.zeros(2, 3, dtype=torch.long),
            torch.tensor([1, 0]),
            TypeError,
            "outputs must be a floating-point",
        ),
        (
            torch.zeros(2, 3, dtype=F64),
            torch.tensor([1, 0], device="meta"),
            ValueError,
            "targets are on meta but the outputs on cpu",
        ),
        (
            torch.zeros(2, 3, dtype=F64),
            torch.tensor([1, 5]),
            ValueError,
            r"targets must lie in \[0, 3\)",
        ),
    ],
    ids=["empty", "nan", "integer", "meta-targets", "out-of-range"],
)
def test_loss_hessian_factors_checks(outputs, targets, error, match):
    with pytest.raises(error, match=match):
        loss_hessian_factors(nn.CrossEntropyLoss(), outputs, targets)


def test_loss_hessian_factors_refuses_nan_targets():
    out = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="targets contain NaN or Inf"):
        loss_hessian_factors(nn.MSELoss(), out, _set(out, (0, 0), math.nan))


# --- options ----------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [0, -3, 1.5, True, "8", None])
@pytest.mark.parametrize("fn", [gram_matrix, ggn_spectrum], ids=lambda f: f.__name__)
def test_bad_chunk_raises(fn, chunk):
    model, loss, X, y, _ = _make()
    with refused_before_forward(model, ValueError, "chunk must be a positive int"):
        fn(model, loss, X, y, chunk=chunk)


@pytest.mark.parametrize(
    "rtol,error,match",
    [
        (-1e-3, ValueError, "rtol must be finite and >= 0"),
        (math.nan, ValueError, "rtol must be finite and >= 0"),
        (math.inf, ValueError, "rtol must be finite and >= 0"),
        ("1e-8", TypeError, "rtol must be a float or None"),
    ],
)
def test_bad_rtol_raises(rtol, error, match):
    model, loss, X, y, _ = _make()
    before = state_of(model)
    with refused_before_forward(model, error, match):
        ggn_spectrum(model, loss, X, y, rtol=rtol)
    assert_state_bitwise(before, model)


def test_bad_path_raises():
    model, loss, X, y, _ = _make("mlp-ce-mean")
    with pytest.raises(ValueError, match="path must be None"):
        gram_matrix(model, loss, X, y, path="fast")


# --- memory budget ---------------------------------------------------------------


def _estimate(model, loss, X, y, fn, engine):
    """The call's own estimate of its peak (bytes), from a run with room to spare."""
    ggn = GGN(model, loss, X, y, engine=engine, memory_budget=2**30)
    ggn.gram() if fn is gram_matrix else ggn.spectrum()
    return sum(ggn.engine_report.memory_estimate.values())


@pytest.mark.parametrize("engine", ["generic", "layerwise"])
@pytest.mark.parametrize("fn", [gram_matrix, ggn_spectrum], ids=lambda f: f.__name__)
def test_memory_budget_is_checked_before_the_forward_pass(fn, engine):
    """The whole call's estimate (lowrank_ggn.core.footprint): over it is refused."""
    model, loss, X, y, _ = _make()
    need = _estimate(model, loss, X, y, fn, engine)
    before = state_of(model)
    with (
        forward_counter(model) as forwards,
        pytest.raises(MemoryBudgetExceeded, match="more than memory_budget") as info,
    ):
        fn(model, loss, X, y, memory_budget=need - 1, engine=engine)
    msg = str(info.value)
    vt = "factors Vᵀ [18, "
    assert (vt in msg) == (engine == "generic"), msg
    for part in (
        "Gram matrices 1 × [18, 18]",
        "recorded forward pass",
        "a batch of at most",
        "params=[...]",
        "mc_samples",
        MEMORY_BUDGET_ENV,
    ):
        assert part in msg, f"{part!r} missing from: {msg}"
    assert forwards[0] <= 1  # the 4-sample probe only
    assert_state_bitwise(before, model)


def test_memory_budget_exactly_enough_passes():
    """The generic engine needs no streamed minimum: its estimate is its bar."""
    model, loss, X, y, _ = _make()
    need = _estimate(model, loss, X, y, gram_matrix, "generic")
    report_close(
        gram_matrix(model, loss, X, y, memory_budget=need, engine="generic"),
        gram_matrix(model, loss, X, y, memory_budget=math.inf),
    )


def test_memory_budget_for_loss_factors_is_checked_before_they_exist(monkeypatch):
    """Segmentation CE: S [K·P, N, K, *pos] is refused before it is formed."""
    model, loss, X, y, _ = _make("segmentation-ce-mean")

    def refuse(*args, **kwargs):
        raise AssertionError("S was formed before the budget check")

    monkeypatch.setattr("lowrank_ggn.core.linearization.hessian_factors", refuse)
    N, K, P = 3, 3, 9
    with pytest.raises(ValueError, match=r"loss-Hessian factors S \[C=27, N=3, O=27\]"):
        budget = K * P * N * K * P * 8 - 1
        linearize(model, loss, X, y, options=GGNOptions.of(memory_budget=budget))


def test_memory_budget_from_environment(monkeypatch):
    model, loss, X, y, _ = _make()
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "1000")
    with pytest.raises(ValueError, match="more than memory_budget=1000 B"):
        gram_matrix(model, loss, X, y)
    gram_matrix(model, loss, X, y, memory_budget=2**30)  # the keyword wins
    for raw, value in [("16GiB", 16 * 2**30), ("2 MB", 2 * 2**20), ("1e9", 1e9)]:
        monkeypatch.setenv(MEMORY_BUDGET_ENV, raw)
        assert resolve_memory_budget() == value
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "lots")
    with pytest.raises(
        ValueError, match=f"{MEMORY_BUDGET_ENV}='lots' is not a positive"
    ):
        gram_matrix(model, loss, X, y)
    monkeypatch.delenv(MEMORY_BUDGET_ENV)
    assert resolve_memory_budget() == DEFAULT_MEMORY_BUDGET == 4 * 2**30


@pytest.mark.parametrize(
    "budget,error", [(0, ValueError), (-5, ValueError), ("8GiB", TypeError)]
)
def test_bad_memory_budget_raises(budget, error):
    model, loss, X, y, _ = _make()
    with refused_before_forward(model, error, "memory_budget"):
        ggn_spectrum(model, loss, X, y, memory_budget=budget)


def test_check_memory_reports_sizes():
    with pytest.raises(ValueError, match=r"needs about 1.00 GiB \(Gram: 1.00 GiB\)"):
        check_memory({"Gram": 2**27}, 8, memory_budget=2**29)


# --- near-zero eigenvalues ---------------------------------------------------------


def _tiny_eigenvalue_problem():
    """``G = 2 XᵀX = diag(2, 2e-20)``: an exact eigenvalue 1e-20·λ_max, below N·C·eps."""
    model = nn.Linear(2, 1, bias=False).double()
    X = torch.tensor([[1.0, 0.0], [0.0, 1e-10]], dtype=F64)
    y = torch.zeros(2, 1, dtype=F64)
    return model, nn.MSELoss(reduction="sum"), X, y


def test_tiny_rtol_keeps_tiny_eigenvalues_without_eigenvectors():
    model, loss, X, y = _tiny_eigenvalue_problem()
    res = ggn_spectrum(model, loss, X, y, rtol=0.0)
    report_close(res.eigenvalues, torch.tensor([2.0, 2e-20], dtype=F64), name="λ")
    assert ggn_spectrum(model, loss, X, y).rank == 1  # default threshold drops it


@pytest.mark.parametrize("rtol", [0.0, 1e-30])
def test_eigenvectors_at_near_zero_eigenvalues_warn_and_are_dropped(rtol):
    model, loss, X, y = _tiny_eigenvalue_problem()
    before = state_of(model)
    with pytest.warns(
        NearZeroEigenvalueWarning, match="1 of 2 eigenvalues are at or below"
    ):
        res = ggn_spectrum(model, loss, X, y, rtol=rtol, eigenvectors=True)
    assert res.rank == 1 and res.eigenvectors.shape == (1, 2)
    assert res.gram_eigenvectors.shape == (2, 1)
    assert res.threshold >= 2 * torch.finfo(F64).eps * 2.0  # N·C·eps·λ_max
    G = dense_ggn(model, loss, X, y)
    e = res.eigenvectors
    report_close(G @ e.T, e.T * res.eigenvalues, name="G e")
    assert_state_bitwise(before, model)


def test_default_threshold_never_warns():
    model, loss, X, y, _ = _make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ggn_spectrum(model, loss, X, y, eigenvectors=True)


def test_parameter_eigenvectors_refuses_near_zero_eigenvalues():
    model, loss, X, y = _tiny_eigenvalue_problem()
    lin = linearize(model, loss, X, y)
    U = torch.eye(2, dtype=F64)
    with pytest.raises(ValueError, match="would divide by ≈0"):
        parameter_eigenvectors(lin, torch.tensor([2.0, 2e-20], dtype=F64), U)
    E = parameter_eigenvectors(lin, torch.tensor([2.0], dtype=F64), U[:, :1])
    report_close(E, torch.tensor([[1.0, 0.0]], dtype=F64), rtol=RTOL)
