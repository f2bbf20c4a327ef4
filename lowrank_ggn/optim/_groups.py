"""``DampedNewton``'s param-group entries: their checks and the update they drive.

Private helpers of :mod:`lowrank_ggn.optim.damped_newton`: the rates
(``lr``, ``complement_lr``, ``momentum``, ``weight_decay``) and the ``damping`` of
:class:`~lowrank_ggn.optim.damping.ConstantDamping` live in ``param_groups``, are
checked at every step (a scheduler or a hand edit may have changed them), and
:func:`apply_step` writes ``Δθ`` group by group.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowrank_ggn.optim.damping import (
    ConstantDamping,
    DampingPolicy,
    check_nonnegative,
)

#: Param-group entries that are rates: finite floats ≥ 0.
RATES = ("lr", "complement_lr", "momentum", "weight_decay")


def check_rate(name: str, value: float) -> float:
    """``value`` as a float; an error naming ``name`` unless finite and ≥ 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float; got {type(value).__name__}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and ≥ 0; got {value}.")
    return float(value)


def check_groups(param_groups: list[dict], policy: DampingPolicy) -> DampingPolicy:
    """Check every group's entries (set by hand or a scheduler); the policy to use.

    A :class:`ConstantDamping` takes the groups' common ``damping`` (set here);
    another policy needs every group's ``damping`` to be ``None``.
    """
    for i, group in enumerate(param_groups):
        for name in RATES:
            try:
                check_rate(name, group[name])
            except (TypeError, ValueError) as err:
                raise type(err)(f"param_groups[{i}]: {err}") from None
    values = [group["damping"] for group in param_groups]
    if not isinstance(policy, ConstantDamping):
        if any(v is not None for v in values):
            raise ValueError(
                f"param_groups' 'damping' entries {values} apply to "
                f"ConstantDamping only; this optimiser's policy is "
                f"{policy!r}: leave them None."
            )
        return policy
    for i, value in enumerate(values):
        try:
            check_nonnegative("damping", value)
        except (TypeError, ValueError) as err:
            raise type(err)(f"param_groups[{i}]: {err}") from None
    if len(set(values)) > 1:
        raise ValueError(
            f"param_groups hold different dampings {values}; the eigen-directions "
            "span every group, so ConstantDamping needs one δ: set the same "
            "'damping' in every group."
        )
    policy.damping = float(values[0])
    return policy


def gradient_left(params: list[Tensor]) -> Tensor | None:
    """``[D]``: the ``.grad`` the caller's ``backward()`` left (None: none left)."""
    grads = [p.grad for p in params]
    if all(g is None for g in grads):
        return None
    for p, g in zip(params, grads):
        if g is not None and g.is_sparse:
            raise ValueError(
                f"a parameter of shape {tuple(p.shape)} has a sparse .grad; "
                "DampedNewton uses dense gradients: call opt.zero_grad() before "
                "the step to let it compute the batch gradient itself."
            )
    return torch.cat(
        [
            (g.detach() if g is not None else torch.zeros_like(p)).reshape(-1)
            for p, g in zip(params, grads)
        ]
    )


@torch.no_grad()
def apply_step(
    param_groups: list[dict], state: dict, newton: Tensor, complement: Tensor
) -> float:
    r"""Write ``Δθ`` into the parameters, group by group; return ``‖Δθ‖²``.

    ``Δθ = −lr · newton − complement_lr · m − lr · weight_decay · θ`` on each group's
    coordinates (``newton``, ``complement``: ``[D]``, the parameters flattened in
    group order); ``m`` is the complement or its heavy-ball buffer
    ``state[p]["complement_momentum_buffer"]`` when ``momentum > 0``.
    """
    squared, start = 0.0, 0
    for group in param_groups:
        lr, c_lr = group["lr"], group["complement_lr"]
        mu, decay = group["momentum"], group["weight_decay"]
        for p in group["params"]:
            part = slice(start, start + p.numel())
            start += p.numel()
            delta = -lr * newton[part].view_as(p)
            step = complement[part].view_as(p)
            if mu:  # heavy ball on the complement's gradient
                own = state[p]
                buffer = own.get("complement_momentum_buffer")
                if buffer is None:
                    buffer = own["complement_momentum_buffer"] = step.clone()
                else:
                    buffer.mul_(mu).add_(step)
                step = buffer
            if c_lr:
                delta = delta - c_lr * step
            if decay:  # decoupled, at the parameters before the step
                delta = delta - (lr * decay) * p
            p.add_(delta)
            squared += float(delta.square().sum())
    return squared


def batch_missing() -> TypeError:
    """The error of a step called without the batch it linearises."""
    return TypeError(
        "DampedNewton.step needs the batch it linearises: opt.step(inputs, targets), "
        "or opt.step(closure, inputs=..., targets=...) in a loop that passes a "
        "closure (Lightning's manual optimisation: opt.step(inputs=X, targets=y))."
    )


__all__ = [
    "RATES",
    "apply_step",
    "batch_missing",
    "check_groups",
    "check_rate",
    "gradient_left",
]
