"""Nothing lost: every public function x every scenario leaves the model bitwise as it was.

The matrix is :data:`public_calls.PUBLIC_CALLS` (one line per public function) times
:data:`SCENARIOS` (successful calls) and :data:`FAILURES` (calls that raise: bad
input, or a model that raises partway through its forward pass after having
changed its own state). After each call, :func:`utils.assert_state_equal` checks
parameters, buffers (BN running statistics, ``num_batches_tracked``), train/eval
modes, ``requires_grad``, ``.grad`` (identity and values), and the autograd version
counter of every tensor, so that a graph built before the call still backpropagates.
"""

from __future__ import annotations

import re

import pytest
import torch
from cases import CASES
from public_calls import CALL_IDS, PUBLIC_CALLS, TARGETLESS
from torch import nn
from utils import assert_state_equal, state_of

from lowrank_ggn.core.state import model_preserved

F64 = torch.float64


def _make(name: str):
    return next(c for c in CASES if c.name == name).make()


def _versions(model: nn.Module) -> list[int]:
    tensors = list(model.parameters()) + list(model.buffers())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return [t._version for t in tensors + grads]


# --- scenarios: each returns (model, loss_func, inputs, targets, params) -------------


def bn_train():
    return (*_make("bn1d-train-ce"), None)


def bn_eval():
    return (*_make("bn1d-eval-ce"), None)


def resnet_bn_train():
    return (*_make("resnet-bn-train-ce"), None)


def existing_grads():
    model, loss, X, y = _make("bn1d-train-mse-sum")
    gen = torch.Generator().manual_seed(3)
    for i, p in enumerate(model.parameters()):
        if i % 3 != 2:  # some .grad set, some None
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    return model, loss, X, y, None


def frozen_parameter():
    model, loss, X, y = _make("bn1d-train-bce")
    model[0].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    return model, loss, X, y, None


def params_subset():
    model, loss, X, y = _make("bn1d-train-ce")
    model[0].bias.grad = torch.ones_like(model[0].bias)
    return model, loss, X, y, [model[3].weight, model[1].bias]


def layernorm_per_sample():
    return (*_make("layernorm-ce"), None)


SCENARIOS = [
    bn_train,
    bn_eval,
    resnet_bn_train,
    existing_grads,
    frozen_parameter,
    params_subset,
    layernorm_per_sample,
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("name,call", PUBLIC_CALLS, ids=CALL_IDS)
def test_state_is_preserved(name, call, scenario):
    model, loss, X, y, params = scenario()
    before, versions = state_of(model), _versions(model)
    call(model, loss, X, y, params)
    assert_state_equal(before, model)
    assert _versions(model) == versions, "an autograd version counter moved"


# --- failing calls ---------------------------------------------------------------


class RaisesPartway(nn.Module):
    """Changes its own (real, not functional) state in ``forward``, then raises.

    Runs BatchNorm in train mode, then writes directly to the *module's* running
    statistics, ``num_batches_tracked``, a weight, a ``.grad``, a train/eval flag
    and registers a new buffer, all bypassing ``functional_call``,
    and raises on forward pass number ``raise_at`` (1-based).
    """

    def __init__(self, raise_at: int = 1) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 5, dtype=F64)
        self.bn = nn.BatchNorm1d(5, dtype=F64)
        self.head = nn.Linear(5, 3, dtype=F64)
        self.raise_at = raise_at
        self.calls = 0
        # numpy views of the real tensors' memory, invisible to functional_call and
        # torch.func (which refuse or redirect in-place writes to captured tensors)
        object.__setattr__(
            self,
            "_real",
            tuple(
                t.detach().numpy()
                for t in (
                    self.bn.running_mean,
                    self.bn.num_batches_tracked,
                    self.lin.weight,
                )
            ),
        )
        object.__setattr__(self, "_weight", self.lin.weight)

    def forward(self, x):
        h = self.bn(self.lin(x))
        mean, count, weight = self._real
        mean += 1.0
        count += 1
        weight *= 2.0
        self._weight.grad = torch.ones(self._weight.shape, dtype=F64)
        self.bn.eval()
        if "junk" not in self.bn._buffers:
            self.bn.register_buffer("junk", torch.zeros(1, dtype=F64))
        self.calls += 1
        if self.calls >= self.raise_at:
            raise RuntimeError(f"boom in forward pass {self.calls}")
        return self.head(torch.tanh(h))


def _partway(raise_at):
    def build():
        torch.manual_seed(0)
        model = RaisesPartway(raise_at)
        model.head.weight.grad = torch.full_like(model.head.weight, -0.5)
        X = torch.randn(6, 4, dtype=F64)
        return model, nn.CrossEntropyLoss(), X, torch.tensor([0, 1, 2, 0, 1, 2]), None

    build.__name__ = f"model_raises_in_forward_{raise_at}"
    return build


def nan_inputs():
    model, loss, X, y, params = bn_train()
    X = X.clone()
    X[2, 1] = float("nan")
    return model, loss, X, y, params


def targets_out_of_range():
    model, loss, X, y, params = params_subset()
    y = y.clone()
    y[0] = 3
    return model, loss, X, y, params


def batch_of_one_bn_train():
    model, loss, X, y, params = existing_grads()
    return model, loss, X[:1], y[:1], params


#: (scenario, error, message regex, whether the call may also succeed)
FAILURES = [
    (nan_inputs, ValueError, "inputs contain NaN or Inf", False),
    (targets_out_of_range, ValueError, r"targets must lie in \[0, 3\)", False),
    (batch_of_one_bn_train, ValueError, "inputs hold one sample", False),
    (_partway(1), RuntimeError, "boom in forward pass 1", False),
    # the memory probe (4 samples) is a forward pass too: later passes shift by one
    (_partway(2), RuntimeError, r"boom in forward pass [234]", True),
    (_partway(3), RuntimeError, r"boom in forward pass [34]", True),
]


@pytest.mark.parametrize("failure", FAILURES, ids=[f[0].__name__ for f in FAILURES])
@pytest.mark.parametrize("name,call", PUBLIC_CALLS, ids=CALL_IDS)
def test_state_is_preserved_when_the_call_fails(name, call, failure):
    scenario, error, match, may_succeed = failure
    if name in TARGETLESS and scenario is targets_out_of_range:
        pytest.skip("does not read the targets")
    model, loss, X, y, params = scenario()
    before, versions = state_of(model), _versions(model)
    if may_succeed:
        # a call that needs fewer forward passes than raise_at succeeds; fine
        try:
            call(model, loss, X, y, params)
        except error as err:
            assert re.search(match, str(err)), f"{err!r} does not match {match!r}"
    else:
        with pytest.raises(error, match=match):
            call(model, loss, X, y, params)
    assert_state_equal(before, model)
    assert _versions(model) == versions, "an autograd version counter moved"
    assert "junk" not in dict(model.named_buffers()), "registered buffer left behind"


def test_raising_model_really_changes_its_state_without_protection():
    """The failing model above does change its state: the matrix can fail."""
    model, loss, X, y, _ = _partway(1)()
    before = state_of(model)
    with pytest.raises(RuntimeError, match="boom"):
        model(X)
    with pytest.raises(AssertionError):
        assert_state_equal(before, model)
    model, loss, X, y, _ = _partway(1)()
    before = state_of(model)
    with pytest.raises(RuntimeError, match="boom"), model_preserved(model):
        model(X)
    assert_state_equal(before, model)


# --- a graph the user built before the call still backpropagates ----------------


@pytest.mark.parametrize("name,call", PUBLIC_CALLS, ids=CALL_IDS)
def test_user_graph_still_backpropagates(name, call):
    def forward_backward_graph():
        model, loss, X, y = _make("bn1d-train-ce")
        model[0].weight.grad = torch.ones_like(model[0].weight)  # accumulates
        user_loss = loss(model(X), y)  # the user's own train-mode forward
        return model, loss, X, y, user_loss

    model, loss, X, y, user_loss = forward_backward_graph()
    before, versions = state_of(model), _versions(model)
    call(model, loss, X, y, None)
    assert_state_equal(before, model)
    assert _versions(model) == versions
    user_loss.backward()  # raises if a saved tensor was modified in place
    expected_model, *_, expected_loss = forward_backward_graph()
    expected_loss.backward()
    for p, q in zip(model.parameters(), expected_model.parameters()):
        assert torch.equal(p.grad, q.grad)
    for a, b in zip(model.buffers(), expected_model.buffers()):
        assert torch.equal(a, b)


def test_autocast_is_switched_off_with_a_warning():
    """Inside ``torch.autocast`` the float32 spectrum, not an empty bfloat16 one."""
    import lowrank_ggn as lg

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    )
    X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    loss = torch.nn.CrossEntropyLoss()
    plain = lg.ggn_spectrum(model, loss, X, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.warns(lg.AutocastDisabledWarning, match="autocast is active"):
            res = lg.ggn_spectrum(model, loss, X, y)
        assert torch.is_autocast_enabled("cpu")  # the caller's region is intact
    assert res.eigenvalues.dtype == torch.float32
    assert torch.equal(res.eigenvalues, plain.eigenvalues)
