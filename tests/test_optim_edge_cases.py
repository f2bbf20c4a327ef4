"""DampedNewton's edge cases: no direction to step along, and bad input.

* Infinite dampings and a zero GGN give no Newton direction (the complement's step
  alone, or a NoProgressWarning).
* Bad input is refused before any work, the parameters unchanged: options at
  construction, a damping policy's output and param-group entries set later (by hand
  or by a scheduler) are checked at each step, each with a message that names the
  argument and what to do.
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import CASES, DTYPE
from test_optim import CASE_BY_NAME, TOP_K, _flat, _newton

from lowrank_ggn.optim import (
    BootstrapDamping,
    ConstantDamping,
    DampedNewton,
    DampingPolicy,
    NoProgressWarning,
    TopKWarning,
)


def test_steps_along_no_direction_with_infinite_damping():
    model, loss, X, y = CASE_BY_NAME["bn1d-train-ce"].make()
    before = _flat(model)
    opt = _newton(
        model, loss, damping=lambda data: torch.full_like(data.eigenvalues, math.inf)
    )
    with pytest.warns(NoProgressWarning, match="0 of 3 directions had a finite"):
        info = opt.step(X, y)
    assert info.num_directions == 0 and info.step_norm == 0.0
    assert torch.equal(_flat(model), before)
    assert torch.equal(info.coefficients, torch.zeros_like(info.coefficients))
    assert isinstance(ConstantDamping(1.0), DampingPolicy)


def test_a_zero_ggn_gives_no_directions():
    """Dead ReLUs below the selected layer: no resolved eigenvalue, K = 0, no step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)
    ).to(DTYPE)
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    X, y = torch.randn(6, 4, dtype=DTYPE), torch.randint(0, 3, (6,))
    policy = BootstrapDamping(generator=torch.Generator().manual_seed(0))
    opt = DampedNewton(
        model[0].parameters(),
        model=model,
        loss_func=torch.nn.CrossEntropyLoss(),
        top_k=TOP_K,
        damping=policy,
        complement_lr=0.1,
    )
    before = _flat(model)
    with pytest.warns(TopKWarning, match="above the 0 eigenvalues"):
        info = opt.step(X, y)
    assert info.eigenvalues.numel() == 0 and info.num_directions == 0
    assert info.gammas.shape == (6, 0) and info.lambdas.shape == (6, 0)
    assert info.step_norm == 0.0 and torch.equal(_flat(model), before)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(top_k=0), ValueError, "top_k"),
        (dict(lr=-1.0), ValueError, "lr must be finite"),
        (dict(complement_lr=math.nan), ValueError, "complement_lr"),
        (dict(damping="big"), TypeError, "damping must be a DampingPolicy"),
        (dict(damping=-1.0), ValueError, "damping must be ≥ 0"),
        (dict(generator=torch.Generator()), ValueError, "only used with mc_samples"),
        (dict(model="net"), TypeError, "model must be a torch.nn.Module"),
        (
            dict(params=[torch.nn.Parameter(torch.zeros(2))]),
            ValueError,
            "parameters of",
        ),
    ],
)
def test_bad_options_are_refused(kwargs, error, match):
    model, loss, X, y = CASES[0].make()
    options = dict(
        params=model.parameters(), model=model, loss_func=loss, top_k=2, damping=0.1
    )
    options.update(kwargs)
    with pytest.raises(error, match=match):
        DampedNewton(options.pop("params"), **options)


@pytest.mark.parametrize(
    ("policy", "match"),
    [
        (lambda d: torch.zeros(5), "one damping per direction"),
        (lambda d: torch.full_like(d.eigenvalues, math.nan), "NaN or negative"),
        (lambda d: -torch.ones_like(d.eigenvalues), "NaN or negative"),
    ],
)
def test_bad_policy_output_is_refused_before_the_parameters_change(policy, match):
    model, loss, X, y = CASES[0].make()
    before = _flat(model)
    opt = DampedNewton(
        model.parameters(), model=model, loss_func=loss, top_k=2, damping=policy
    )
    with pytest.raises(ValueError, match=match):
        opt.step(X, y)
    assert torch.equal(_flat(model), before)


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("lr", math.nan, ValueError),
        ("lr", -0.5, ValueError),
        ("complement_lr", math.inf, ValueError),
        ("lr", "fast", TypeError),
    ],
)
def test_param_group_rates_set_later_are_checked_at_each_step(name, value, error):
    """A scheduler or a hand edit after construction: refused, nothing changes."""
    model, loss, X, y = CASES[0].make()
    before = _flat(model)
    opt = DampedNewton(
        model.parameters(), model=model, loss_func=loss, top_k=2, damping=1.0
    )
    opt.param_groups[0][name] = value
    with pytest.raises(error, match=rf"param_groups\[0\]: {name} must be"):
        opt.step(X, y)
    assert torch.equal(_flat(model), before)
