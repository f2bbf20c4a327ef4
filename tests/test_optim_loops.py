"""DampedNewton in the loops of torch.optim users, each number against dense float64.

* Param-group entries: complement momentum, decoupled weight decay and the constant
  damping give the step of the dense reference (``dense_ggn``'s ``eigh``,
  ``dense_gradient``) over two steps, BatchNorm in train mode included; schedulers
  drive them (``OneCycleLR`` and ``CyclicLR`` cycle ``momentum``); ``state_dict``
  restores them, the momentum buffers and the bootstrap's own generator.
* A ``.grad`` the caller's ``backward()`` left is the step's gradient (reference:
  the dense gradient of the caller's loss); ``step(closure, inputs=, targets=)`` runs
  the closure once, first; a Lightning-style manual-optimisation loop runs as
  Lightning calls it.
* ``top_k`` above the rank warns once; ``StepInfo`` keeps eigenvectors on request;
  a step that changes nothing warns.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from cases import DTYPE
from test_optim import CASE_BY_NAME, _dense_problem, _flat
from utils import report_close

from lowrank_ggn import SampleMixingWarning
from lowrank_ggn.optim import (
    BootstrapDamping,
    ConstantDamping,
    DampedNewton,
    NoProgressWarning,
    TopKWarning,
)
from lowrank_ggn.reference import dense_gradient

TOP_K = 3
NAMES = ["mlp-ce-mean", "mlp-mse-sum", "bn1d-train-ce", "bn2d-train-ce"]


def _opt(model, loss, params=None, **kwargs) -> DampedNewton:
    params = model.parameters() if params is None else params
    kwargs = {"top_k": TOP_K, "damping": 0.1, "keep_eigenvectors": True, **kwargs}
    return DampedNewton(params, model=model, loss_func=loss, **kwargs)


def _quiet_step(opt, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these steps warns
        return opt.step(*args, **kwargs)


def _reference(dense, theta, buffer, *, lr, c_lr, mu, decay, damping, g=None):
    """``Δθ`` and the new momentum buffer, from the dense GGN's ``eigh``."""
    evals, evecs, g_batch = dense
    g = g_batch if g is None else g
    lam, E = evals[:TOP_K], evecs[:TOP_K]
    gam = E @ g
    c = g - gam @ E  # the complement's gradient
    buffer = c if buffer is None else mu * buffer + c
    step = buffer if mu else c
    delta = -lr * (gam / (lam + damping)) @ E - c_lr * step - lr * decay * theta
    return delta, buffer


@pytest.mark.parametrize("name", NAMES)
def test_momentum_weight_decay_and_damping_over_two_steps(name):
    """Step 2 uses step 1's buffer and a damping and lr changed in param_groups."""
    case = CASE_BY_NAME[name]
    model, loss, X, y = case.make()
    X2, y2 = X.flip(0), y.flip(0)  # the samples in another order
    settings = dict(lr=0.7, complement_lr=0.3, momentum=0.9, weight_decay=0.05)
    opt = _opt(model, loss, **settings)
    buffer = None
    for X_t, y_t, damping, lr in ((X, y, 0.1, 0.7), (X2, y2, 0.5, 0.35)):
        opt.param_groups[0]["damping"] = damping
        opt.param_groups[0]["lr"] = lr
        dense = _dense_problem(model, loss, X_t, y_t)
        theta = _flat(model)
        expected, buffer = _reference(
            dense,
            theta,
            buffer,
            lr=lr,
            c_lr=0.3,
            mu=0.9,
            decay=0.05,
            damping=damping,
        )
        info = _quiet_step(opt, X_t, y_t)
        report_close(_flat(model) - theta, expected, name="Δθ")
        assert info.step_norm == pytest.approx(float(expected.norm()), rel=1e-10)
        assert torch.all(info.damping == damping) and info.gradient_source == "batch"
    assert opt.damping.damping == 0.5


@pytest.mark.parametrize(
    "make",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
        lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.5),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=4),
        lambda o: torch.optim.lr_scheduler.CyclicLR(
            o, base_lr=0.1, max_lr=1.0, step_size_up=2
        ),
        lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0),
    ],
    ids=["StepLR", "ExponentialLR", "Cosine", "LinearLR", "OneCycle", "Cyclic", "RLRP"],
)
def test_schedulers_drive_the_param_groups(make):
    """Every scheduler runs; each step uses the lr and momentum it set (dense)."""
    model, loss, X, y = CASE_BY_NAME["bn1d-train-ce"].make()
    opt = _opt(model, loss, complement_lr=0.2, momentum=0.5)
    sched = make(opt)
    buffer = None
    for _ in range(3):
        group = opt.param_groups[0]
        lr, mu = group["lr"], group["momentum"]
        dense, theta = _dense_problem(model, loss, X, y), _flat(model)
        expected, buffer = _reference(
            dense, theta, buffer, lr=lr, c_lr=0.2, mu=mu, decay=0.0, damping=0.1
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no scheduler-order warning either
            info = opt.step(X, y)
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step(info.loss + 1.0)  # never better: lr falls
            else:
                sched.step()
        report_close(_flat(model) - theta, expected, name="scheduled Δθ")


def test_state_dict_restores_every_entry_and_the_bootstraps_own_generator():
    """A resumed run equals the uninterrupted one; no generator was passed."""
    case = CASE_BY_NAME["bn2d-train-ce"]
    model, loss, X, y = case.make()
    X2 = X + 0.1 * torch.randn(X.shape, generator=torch.Generator().manual_seed(1))

    def make(m):
        return _opt(
            m,
            loss,
            damping=BootstrapDamping(),  # no generator: its own, seeded globally
            complement_lr=0.2,
            momentum=0.8,
            weight_decay=0.01,
        )

    torch.manual_seed(0)
    opt = make(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleMixingWarning)
        opt.step(X, y)
        opt.param_groups[0]["complement_lr"] = 0.15
        state = copy.deepcopy(opt.state_dict())
        twin_model = copy.deepcopy(model)
        torch.manual_seed(123)  # another seed: only load_state_dict makes them agree
        twin = make(twin_model)
        twin.load_state_dict(state)
        assert twin.param_groups[0]["complement_lr"] == 0.15
        assert twin.param_groups[0]["damping"] is None
        buffers = [s["complement_momentum_buffer"] for s in twin.state.values()]
        assert len(buffers) == len(list(model.parameters()))
        for _ in range(2):
            a, b = opt.step(X2, y), twin.step(X2, y)
            assert torch.equal(a.damping, b.damping)
    assert torch.equal(_flat(model), _flat(twin_model))

    # ConstantDamping: δ is a param-group entry and part of the state
    model, loss, X, y = case.make()
    opt = _opt(model, loss, damping=ConstantDamping(0.3))
    assert opt.param_groups[0]["damping"] == 0.3
    opt.param_groups[0]["damping"] = 0.7
    twin = _opt(copy.deepcopy(model), loss, damping=2.0)
    twin.load_state_dict(opt.state_dict())
    assert twin.param_groups[0]["damping"] == 0.7 and twin.damping.damping == 0.7


@pytest.mark.parametrize(
    ("entry", "value", "error", "match"),
    [
        ("momentum", -0.1, ValueError, r"param_groups\[1\]: momentum must be"),
        ("weight_decay", math.nan, ValueError, r"param_groups\[1\]: weight_decay"),
        ("damping", -1.0, ValueError, r"param_groups\[1\]: damping must be ≥ 0"),
        ("damping", 0.2, ValueError, "different dampings"),
    ],
)
def test_bad_group_entries_are_refused_before_anything_changes(
    entry, value, error, match
):
    model, loss, X, y = CASE_BY_NAME["mlp-ce-mean"].make()
    first, rest = list(model[0].parameters()), list(model[1:].parameters())
    opt = _opt(model, loss, [{"params": first}, {"params": rest}])
    opt.param_groups[1][entry] = value
    before = _flat(model)
    with pytest.raises(error, match=match):
        opt.step(X, y)
    assert torch.equal(_flat(model), before)

    policy = BootstrapDamping(generator=torch.Generator().manual_seed(0))
    opt = _opt(model, loss, damping=policy)
    opt.param_groups[0]["damping"] = 0.1
    with pytest.raises(ValueError, match="apply to ConstantDamping only"):
        opt.step(X, y)


@pytest.mark.parametrize("name", NAMES)
def test_a_grad_from_the_callers_backward_is_the_gradient(name):
    """The caller's loss with an L2 term: the step uses its gradient, not the batch's."""
    model, loss, X, y = CASE_BY_NAME[name].make()
    params = list(model.parameters())
    coef = 0.3
    dense = _dense_problem(model, loss, X, y)
    theta = _flat(model)
    g = dense_gradient(model, loss, X, y) + coef * theta  # ∇(L + coef/2 ‖θ‖²)
    expected, _ = _reference(
        dense, theta, None, lr=1.0, c_lr=0.2, mu=0.0, decay=0.0, damping=0.1, g=g
    )
    opt = _opt(model, loss, complement_lr=0.2)
    opt.zero_grad()
    out = model(X)
    value = loss(out, y) + 0.5 * coef * sum(p.square().sum() for p in params)
    value.backward()
    grads = [p.grad.clone() for p in params]
    info = _quiet_step(opt, X, y)
    report_close(_flat(model) - theta, expected, name="Δθ with the caller's .grad")
    assert info.gradient_source == "grad"
    assert all(torch.equal(p.grad, q) for p, q in zip(params, grads))  # untouched


def test_missing_grads_count_as_zero_and_sparse_ones_are_refused():
    model, loss, X, y = CASE_BY_NAME["mlp-ce-mean"].make()
    params = list(model.parameters())
    dense, theta = _dense_problem(model, loss, X, y), _flat(model)
    g = dense_gradient(model, loss, X, y)
    for p in params[1:]:
        p.grad = None
    params[0].grad = g[: params[0].numel()].view_as(params[0]).clone()
    g_used = torch.cat(
        [g[: params[0].numel()], torch.zeros_like(g[params[0].numel() :])]
    )
    expected, _ = _reference(
        dense, theta, None, lr=1.0, c_lr=0.2, mu=0.0, decay=0.0, damping=0.1, g=g_used
    )
    info = _quiet_step(_opt(model, loss, complement_lr=0.2), X, y)
    report_close(_flat(model) - theta, expected, name="Δθ, None grads as 0")
    assert info.gradient_source == "grad"

    params[0].grad = params[0].grad.to_sparse()
    with pytest.raises(ValueError, match="sparse .grad.*zero_grad"):
        _opt(model, loss).step(X, y)


def test_step_with_a_closure_and_the_batch_missing():
    model, loss, X, y = CASE_BY_NAME["bn1d-train-ce"].make()
    twin = copy.deepcopy(model)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        value = loss(model(X), y)
        value.backward()
        return value

    opt = _opt(model, loss, complement_lr=0.2)
    with torch.no_grad():  # the closure runs with gradients enabled all the same
        info = opt.step(closure, inputs=X, targets=y)
    assert calls == [True] and info.gradient_source == "grad"
    reference = _quiet_step(_opt(twin, loss, complement_lr=0.2), X, y)
    assert reference.gradient_source == "batch"
    report_close(_flat(model), _flat(twin), name="θ: closure's .grad = batch gradient")

    for args, kwargs in (((), {}), ((closure,), {}), ((X,), {})):
        with pytest.raises(TypeError, match=r"needs the batch.*opt.step\(inputs"):
            opt.step(*args, **kwargs)


class LightningStyleOptimizer:
    """What Lightning's ``LightningOptimizer`` does with ``step``/``zero_grad``.

    ``step(closure=None, **kwargs)`` goes through the strategy and precision plugin to
    ``optimizer.step(closure=wrapped, **kwargs)``, where ``wrapped`` runs the user's
    closure (a no-op in manual optimisation) and then the ``on_before_optimizer_step``
    hook; the hook must run once per step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer, self.hooks = optimizer, 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None, **kwargs):
        closure = closure or (lambda: None)

        def wrapped():
            out = closure()
            self.hooks += 1  # on_before_optimizer_step
            return out

        return self.optimizer.step(closure=wrapped, **kwargs)


def test_lightning_style_manual_optimisation():
    """``training_step`` with ``manual_backward`` and ``opt.step(inputs=, targets=)``."""
    model, loss, X, y = CASE_BY_NAME["bn2d-train-ce"].make()
    twin = copy.deepcopy(model)
    opt = LightningStyleOptimizer(_opt(model, loss, complement_lr=0.2, momentum=0.5))
    plain = _opt(twin, loss, complement_lr=0.2, momentum=0.5)
    batches = [(X, y), (X.flip(0), y.flip(0))]
    for Xb, yb in batches:  # the body of a LightningModule.training_step
        opt.zero_grad()
        value = loss(model(Xb), yb)
        value.backward()  # self.manual_backward(value)
        info = opt.step(inputs=Xb, targets=yb)
        assert info.gradient_source == "grad"
        _quiet_step(plain, Xb, yb)
    assert opt.hooks == len(batches)
    report_close(_flat(model), _flat(twin), name="θ after manual optimisation")
    checkpoint = opt.optimizer.state_dict()  # Lightning checkpoints the optimiser
    restored = _opt(copy.deepcopy(model), loss, complement_lr=0.2, momentum=0.5)
    restored.load_state_dict(checkpoint)
    assert restored.state_dict()["param_groups"] == checkpoint["param_groups"]


def test_top_k_above_the_rank_warns_once_and_eigenvectors_on_request():
    model, loss, X, y = CASE_BY_NAME["mlp-ce-mean"].make()
    opt = _opt(model, loss, top_k=500, keep_eigenvectors=False, complement_lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        infos = [opt.step(X, y) for _ in range(2)]
    caught = [w for w in caught if issubclass(w.category, TopKWarning)]
    K = infos[0].eigenvalues.numel()
    assert len(caught) == 1 and f"top_k=500 is above the {K} eigenvalues" in str(
        caught[0].message
    )
    assert all(i.eigenvectors is None for i in infos)
    kept = _quiet_step(_opt(model, loss), X, y)
    D = sum(p.numel() for p in model.parameters())
    assert kept.eigenvectors.shape == (TOP_K, D) and kept.eigenvectors.dtype == DTYPE


def test_a_step_that_changes_nothing_warns():
    model, loss, X, y = CASE_BY_NAME["mlp-ce-mean"].make()
    opt = _opt(model, loss, lr=0.0, complement_lr=0.0)
    before = _flat(model)
    with pytest.warns(NoProgressWarning, match="left the parameters unchanged"):
        info = opt.step(X, y)
    assert info.step_norm == 0.0 and torch.equal(_flat(model), before)
