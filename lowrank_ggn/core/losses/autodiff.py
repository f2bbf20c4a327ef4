r"""Any per-sample loss: the :class:`AutodiffLoss` wrapper and its structure check.

A loss ``loss(outputs, targets) -> scalar`` (a module or a plain callable; a tuple of
targets is passed as ``loss(outputs, *targets)``) is usable for the GGN when it has
the per-sample-plus-reduction structure

.. math::
    L(F) = ρ \sum_{n=1}^N ℓ_n(F_n), \qquad ℓ_n(f) := \text{loss}(f[\text{None}],
    y_n[\text{None}]),\qquad ρ ∈ \{1/N, 1\},

i.e. ``ℓ_n`` is the loss of sample ``n`` alone (a batch of one) and ``ρ = 1/N``
(``reduction='mean'``, ``'batchmean'``) or ``ρ = 1`` (``'sum'``). Then ``∇²_F L`` is
block diagonal with blocks ``H_n = ρ ∇²ℓ_n(F_n)`` (``[O, O]``, ``O = Π out``).

**Structure check** (:func:`check_structure`, once per batch, before any factor):
with a random tangent ``v`` ``[N, *out]``, the batch loss, its gradient and its
Hessian-vector product must equal ``ρ`` times the per-sample ones,

.. math::
    L = ρ \sum_n ℓ_n,\qquad ∇_{F_n} L = ρ ∇ℓ_n,\qquad (∇²_F L\, v)_n = ρ ∇²ℓ_n v_n,

to round-off (:func:`lowrank_ggn.core.tolerances.roundoff_rtol` of the dtype,
relative to the largest magnitude on either side). The last identity says that
``∇²_F L`` has no blocks coupling samples (for almost every ``v``). ``ρ`` comes from
the module's ``reduction`` attribute where there is one, else it is the candidate in
``{1/N, 1}`` that passes; it is fixed from the first batch that tells the two apart
(``N > 1`` and a nonzero loss, gradient or curvature).

**Factors** (:mod:`lowrank_ggn.core.loss_hessians`): once the check has passed,
``H_n`` comes from automatic differentiation per sample and its square roots from
``eigh``; this module supplies the per-sample calls (``vmap`` over samples, a loop
over batches of one where ``vmap`` cannot run the loss) that both use.

Reference: Dangel, Tatzel & Hennig, *ViViT: Curvature access through the generalized
Gauss-Newton's low-rank structure*, TMLR 2022, https://arxiv.org/abs/2106.02624.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vjp, vmap

from lowrank_ggn.core.autodiff import quiet_fallbacks
from lowrank_ggn.core.inputs import ModelInputs
from lowrank_ggn.core.loss_positions import position_ce_weights
from lowrank_ggn.core.tolerances import roundoff_rtol

#: ``reduction`` attribute of a loss module -> its ``ρ`` kind (``'mean'``: ``1/N``).
MODULE_REDUCTIONS = {"mean": "mean", "batchmean": "mean", "sum": "sum"}

#: Seed of the random tangent of the structure check (deterministic checks).
TANGENT_SEED = 0


def call_loss(loss: Callable, outputs: Tensor, targets: object) -> Tensor:
    """``loss(outputs, *targets)`` for a tuple of targets, else ``loss(outputs, targets)``."""
    if isinstance(targets, tuple) and not isinstance(loss, AutodiffLoss):
        return loss(outputs, *targets)
    return loss(outputs, targets)


def loss_name(loss: object) -> str:
    """``HuberLoss(reduction='mean')``, ``<lambda>`` or the function's name."""
    if isinstance(loss, AutodiffLoss):
        loss = loss.loss
    if isinstance(loss, nn.Module):
        red = getattr(loss, "reduction", None)
        return type(loss).__name__ + (f"(reduction={red!r})" if red else "")
    return getattr(loss, "__qualname__", type(loss).__name__)


class AutodiffLoss(nn.Module):
    r"""A loss whose Hessian square roots come from automatic differentiation.

    Wraps any ``loss(outputs, targets) -> scalar`` with the per-sample-plus-reduction
    structure ``L = ρ Σ_n ℓ_n`` (module docstring). Calling the wrapper calls the
    loss, unpacking a tuple of targets: ``wrapper(F, (y, var)) = loss(F, y, var)``.

    Attributes:
        loss: The user's loss, unchanged.
        reduction: ``'mean'`` (``ρ = 1/N``) or ``'sum'`` (``ρ = 1``): from the
            module's ``reduction`` (``'batchmean'`` counts as ``'mean'``), else from
            the first batch that determines it (:func:`check_structure`); until then
            ``'mean'``, provisionally.
        reduction_known: Whether :attr:`reduction` is determined.

    Example:
        >>> import torch
        >>> loss = AutodiffLoss(lambda out, y: ((out - y) ** 4).sum())
        >>> out, y = torch.randn(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64)
        >>> check_structure(loss, out, y)
        >>> assert loss.reduction == "sum" and loss.reduction_known
    """

    def __init__(self, loss: Callable) -> None:
        super().__init__()
        if isinstance(loss, AutodiffLoss):
            loss = loss.loss
        self.loss = loss
        reduction = (
            getattr(loss, "reduction", None) if isinstance(loss, nn.Module) else None
        )
        self.reduction = MODULE_REDUCTIONS.get(reduction, "mean")
        self.reduction_known = reduction in MODULE_REDUCTIONS
        self._from_module = self.reduction_known
        self._verified: list | None = None
        #: Position weights ``w`` ``[N, *pos]`` of the last verified batch when the
        #: loss is cross-entropy over positions (:mod:`lowrank_ggn.core.loss_positions`).
        self.positions: Tensor | None = None

    def forward(self, outputs: Tensor, targets: object) -> Tensor:
        """The batch loss ``loss(outputs, *targets)`` (tuple) or ``loss(outputs, targets)``."""
        return call_loss(self.loss, outputs, targets)

    def extra_repr(self) -> str:
        """The wrapped function's name (a wrapped module prints as a child)."""
        return (
            "" if isinstance(self.loss, nn.Module) else f"loss={loss_name(self.loss)}"
        )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_verified"] = None  # weak references do not pickle
        return state

    # ------------------------------------------------ the last verified batch
    def _is_verified(self, outputs: Tensor, targets: object) -> bool:
        tensors = _tensors_of(outputs, targets)
        seen = self._verified
        return (
            seen is not None
            and len(seen) == len(tensors)
            and all(
                ref() is t and version == t._version
                for (ref, version), t in zip(seen, tensors)
            )
        )

    def _mark_verified(self, outputs: Tensor, targets: object) -> None:
        self._verified = [
            (weakref.ref(t), t._version) for t in _tensors_of(outputs, targets)
        ]


def _tensors_of(outputs: Tensor, targets: object) -> list[Tensor]:
    items = targets if isinstance(targets, tuple) else (targets,)
    return [outputs, *(t for t in items if isinstance(t, Tensor))]


def sample_weight_of(reduction: str, batch_size: int) -> float:
    """``ρ``: ``1/N`` for ``'mean'``, 1 for ``'sum'``."""
    return 1.0 if reduction == "sum" else 1.0 / batch_size


# ------------------------------------------------------------ per-sample calls
def _targets_view(targets: object, batch_size: int) -> ModelInputs:
    """Targets as :class:`ModelInputs`: entries with ``N`` rows are per-sample."""
    return ModelInputs(targets, batch_size, name="targets")


def _per_sample(
    fn: Callable,
    looped: Callable,
    outputs: Tensor,
    extra: tuple[Tensor, ...],
    view: ModelInputs,
) -> tuple[Tensor, ...]:
    """``fn(F_n, *extra_n, y_n)`` for every sample, stacked over ``n``.

    ``fn`` works on one sample without its batch dimension (``vmap`` over samples);
    where ``vmap`` cannot run the loss, ``looped(F[n:n+1], *extra[n:n+1], y_{n:n+1})``
    runs one batch of one at a time (plain autograd).
    """

    def one(f: Tensor, *args: Tensor) -> tuple[Tensor, ...]:
        k = len(extra)
        # the sample's targets as a batch of one, shared entries unchanged
        y = view.with_tensors([t.unsqueeze(0) for t in args[k:]], 1).raw
        return fn(f, *args[:k], y)

    try:
        with quiet_fallbacks():
            return vmap(one)(outputs, *extra, *view.tensors)
    except Exception:  # no batching rule, or data-dependent control flow
        pass
    rows = [
        looped(
            outputs[n : n + 1],
            *(e[n : n + 1] for e in extra),
            view.select(slice(n, n + 1)).raw,
        )
        for n in range(outputs.shape[0])
    ]
    return tuple(torch.cat(parts) for parts in zip(*rows))


def _value_grad_hvp(
    loss: Callable, F: Tensor, v: Tensor, y: object
) -> tuple[Tensor, Tensor, Tensor]:
    """``(L, ∇_F L, ∇²_F L v)`` of ``L = loss(F, y)`` by plain autograd."""
    with torch.enable_grad():
        F = F.detach().requires_grad_(True)
        value = call_loss(loss, F, y)
        g = None
        if value.requires_grad:  # else the loss does not depend on the outputs
            (g,) = torch.autograd.grad(value, F, create_graph=True, allow_unused=True)
        if g is None:
            g = torch.zeros_like(F)
        hv = None
        if g.requires_grad:
            (hv,) = torch.autograd.grad(g, F, v, allow_unused=True)
    hv = torch.zeros_like(F) if hv is None else hv
    return value.detach().reshape(1), g.detach(), hv.detach()


def _rel_err(a: Tensor, b: Tensor) -> float:
    """``max|a − b| / max(max|a|, max|b|)`` (0 when both vanish)."""
    scale = max(a.abs().max().item(), b.abs().max().item())
    err = (a - b).abs().max().item()
    return 0.0 if err == 0.0 else err / scale


# ------------------------------------------------------------ structure check
def structure_deviations(
    loss: AutodiffLoss, outputs: Tensor, targets: object
) -> dict[str, tuple[float, float, float]]:
    """Relative deviations from ``L = ρ Σ_n ℓ_n`` per admissible reduction.

    For ``'mean'`` (``ρ = 1/N``) and ``'sum'`` (``ρ = 1``), or only the known one:
    the batch loss against ``ρ Σ_n ℓ_n``, ``∇_F L`` against ``ρ ∇ℓ_n`` stacked, and
    ``∇²_F L v`` against ``ρ ∇²ℓ_n v_n`` for a fixed-seed random ``v`` (each
    relative; round-off size when the structure holds). :func:`check_structure` and
    :func:`lowrank_ggn.audit_structure` read them.

    Raises:
        ValueError: If the loss is not a finite scalar.
    """
    name, N = loss_name(loss), outputs.shape[0]
    outputs = outputs.detach()
    view = _targets_view(targets, N)
    with torch.enable_grad():
        value = call_loss(loss.loss, outputs, targets)
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = (
            tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        )
        raise ValueError(
            f"loss_func {name} must return a scalar tensor (the batch loss); got "
            f"{shape}. Use reduction='mean' or 'sum'."
        )
    gen = torch.Generator().manual_seed(TANGENT_SEED)
    v = torch.randn(outputs.shape, generator=gen, dtype=outputs.dtype).to(
        outputs.device
    )
    # batch side: L, ∇_F L, ∇²_F L v
    L, g, hv = _value_grad_hvp(loss.loss, outputs, v, targets)

    def terms(f: Tensor, t: Tensor, y: object) -> tuple[Tensor, Tensor, Tensor]:
        def ell(x: Tensor) -> Tensor:
            return call_loss(loss.loss, x.unsqueeze(0), y).reshape(())

        gn, hvp_fn, val = vjp(grad_and_value(ell), f, has_aux=True)
        (hvn,) = hvp_fn(t)
        return val, gn, hvn

    # sample side: ℓ_n, ∇ℓ_n, ∇²ℓ_n v_n, each stacked over n
    ell, g1, hv1 = _per_sample(
        terms, lambda F, t, y: _value_grad_hvp(loss.loss, F, t, y), outputs, (v,), view
    )
    if not (torch.isfinite(L).all() and torch.isfinite(ell).all()):
        raise ValueError(
            f"loss_func {name} is not finite at these outputs and targets (batch loss "
            f"{L.item():.3e}); check the targets and the outputs' range (e.g. "
            "PoissonNLLLoss(log_input=False) needs positive outputs)."
        )
    candidates = [loss.reduction] if loss.reduction_known else ["mean", "sum"]
    errors = {}
    for reduction in candidates:
        rho = sample_weight_of(reduction, N)
        # the sum's round-off scales with Σ|ℓ_n| (terms of either sign)
        value_scale = max(L.abs().item(), rho * ell.abs().sum().item())
        value_err = (L - rho * ell.sum()).abs().item()
        errors[reduction] = (
            value_err / value_scale if value_err else 0.0,
            _rel_err(g, rho * g1),
            _rel_err(hv, rho * hv1),
        )
    return errors


def check_structure(loss: AutodiffLoss, outputs: Tensor, targets: object) -> None:
    """Check ``L = ρ Σ_n ℓ_n`` with a block-diagonal Hessian; fix ``loss.reduction``.

    See the module docstring for the three identities. Runs once per batch: a
    repeated call with the same (unmodified) tensors returns at once.

    Args:
        loss: The wrapper.
        outputs: ``[N, *out]``, finite.
        targets: A tensor ``[N, …]`` or a tuple of entries (``N`` rows: per-sample).

    Raises:
        ValueError: If the loss is not a finite scalar, or the identities fail for
            every admissible ``ρ`` (a loss that couples samples).

    """
    if loss._is_verified(outputs, targets):
        return
    name, given = loss_name(loss), outputs
    errors = structure_deviations(loss, outputs, targets)
    tol = roundoff_rtol(outputs.dtype)
    passed = [r for r, errs in errors.items() if max(errs) <= tol]
    loss.positions = position_ce_weights(
        lambda out: call_loss(loss.loss, out, targets), outputs
    )
    if not passed and loss.positions is not None:
        # a sum over positions with weights of the batch (mean over its tokens,
        # ignored positions): block diagonal all the same; per-sample quantities
        # take ρ = 1/N (or 1 for a declared 'sum') with ℓ_n its samples' terms / ρ
        passed = [loss.reduction]
    if not passed:
        found = "; ".join(
            f"ρ = {'1/N' if r == 'mean' else '1'}: loss {e[0]:.1e}, gradient "
            f"{e[1]:.1e}, Hessian-vector product {e[2]:.1e}"
            for r, e in errors.items()
        )
        source = (
            f" (ρ from its reduction={getattr(loss.loss, 'reduction', None)!r})"
            if loss._from_module
            else ""
        )
        raise ValueError(
            f"loss_func {name} is not a per-sample loss plus reduction{source}: the "
            "batch loss L must equal ρ Σ_n ℓ_n with ℓ_n = loss_func(F_n[None], "
            "y_n[None]) the loss of sample n alone and ρ = 1/N or 1, with a Hessian "
            f"that does not couple samples. Relative deviations ({found}) exceed the "
            f"round-off tolerance {tol:g}. Losses that couple samples (batch "
            "normalisation inside the loss, functions of sums over the batch, "
            "CrossEntropyLoss(weight=...) with reduction='mean') have no GGN of the "
            "form Σ_n J_nᵀ H_n J_n."
        )
    if len(passed) == 1 and not loss.reduction_known:
        loss.reduction, loss.reduction_known = passed[0], True
    loss._mark_verified(given, targets)


__all__ = [
    "AutodiffLoss",
    "MODULE_REDUCTIONS",
    "call_loss",
    "check_structure",
    "loss_name",
    "sample_weight_of",
]
