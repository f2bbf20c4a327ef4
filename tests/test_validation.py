"""Early, clear errors: every bad input raises before heavy work and loses nothing.

Each entry of :data:`BAD_INPUTS` is run through the model-taking engine functions
(:data:`public_calls.ENGINE_CALLS`): it must raise the named error with a message
that names the argument and the fix, at the stated stage (``"before_forward"``: the
model's ``forward`` never ran; ``"before_backward"``: no vector-Jacobian product
started), and leave the model bitwise as it was.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from bad_inputs import BAD_DATA, _make, _set
from bad_setups import BAD_SETUPS
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
from utils import state_of

from lowrank_ggn import (
    ggn_spectrum,
    gram_matrix,
    loss_hessian_factors,
)
from lowrank_ggn.core.linearization import Linearization
from lowrank_ggn.reference import dense_ggn, dense_output_hessian

F64 = torch.float64
MODEL_CALLS = [c for c in ENGINE_CALLS if c[0] != "loss_hessian_factors"]
MODEL_IDS = [c[0] for c in MODEL_CALLS]


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


#: Every bad input: bad data, then bad set-ups (``tests/bad_inputs.py``,
#: ``tests/bad_setups.py``).
BAD_INPUTS = BAD_DATA + BAD_SETUPS
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
