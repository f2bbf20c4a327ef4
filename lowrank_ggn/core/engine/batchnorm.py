r"""BatchNorm recomputed with its statistics as gated graph nodes.

During the capture's forward pass (:mod:`~lowrank_ggn.core.engine.capture`), the
``F.batch_norm`` call inside every BatchNorm module (``SyncBatchNorm`` excluded; fused
subclasses such as timm's ``BatchNormAct2d`` included) returns, once checked against
the call's true output (:class:`BatchNormCalls`),

.. math::
    y = γ ⊙ (x − μ) ⊙ r + β, \qquad μ = \operatorname{mean}(x), \quad
    r = (\operatorname{var}(x) + ε)^{-1/2}

per channel ``k = 1…K``, over the batch and all positions (biased variance, as PyTorch
does in train mode); ``x``, ``y`` ``[N, K, *pos]``, ``μ``, ``r`` ``[K]``. With running
statistics (eval mode) ``μ`` and ``r`` are the module's buffers, constants. ``μ`` and
``r`` are kept as graph nodes (outputs of one autograd function with a fused backward,
:class:`_BatchNorm`), and a :class:`FreezeSwitch` gates the gradients that flow
through them: while frozen, backward passes see the network with its statistics held
fixed, which is sample-independent (the frozen backward of ``y`` is ``γ r δ`` per
sample). Under :attr:`~lowrank_ggn.core.engine.report.Strategy.BN_SPLIT` a parameter
block is then ``V_p = V_{f,p} + B_p W``: the frozen rows plus the statistics
directions ``B_p`` ``[2K, numel]`` weighted by the coefficients
:meth:`BNLayer.coefficients` ``W`` ``[2K, NC]``.

The recomputed output equals the call's to round-off (checked on every capture); the
module itself is never changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from lowrank_ggn.core.model import module_label
from lowrank_ggn.core.paths import uses_batch_statistics
from lowrank_ggn.core.tolerances import roundoff_close


class FreezeSwitch:
    """While :attr:`frozen`, backward passes hold the BatchNorm statistics fixed."""

    def __init__(self) -> None:
        self.frozen = False

    @contextmanager
    def freeze(self) -> Iterator[None]:
        """Backward passes inside this block hold the statistics fixed."""
        self.frozen = True
        try:
            yield
        finally:
            self.frozen = False


@dataclass
class BNLayer:
    """A BatchNorm, recomputed with its statistics ``μ``, ``r`` as graph nodes.

    Attributes:
        name: Qualified module name.
        module: The module.
        weight: ``γ`` if selected, else ``None``; likewise ``bias`` (``β``).
        gamma: ``γ`` as values ``[K]`` (ones for ``affine=False``), detached.
        output: ``y`` in the graph, ``[N, K, *pos]``.
        mean: ``μ`` ``[K]`` in the graph; ``inv_std``: ``r`` ``[K]``.
        xhat: ``(x − μ) r`` ``[N, K, *pos]``, detached.
        sums: Per column, ``Σ_pos δ`` and ``Σ_pos δ ⊙ x̂`` of the frozen output
            cotangent ``δ``, each ``[NC, K]``.
        calls: How often the module ran in the forward pass (captured if once).
        batch_stats: Whether it normalises with batch statistics (else running
            statistics, constants).
        input: ``x`` in the graph (identifies the layer that feeds it).
        target: The gradient edge of ``y`` as computed (``None`` if ``y`` needs no
            gradient): backward passes ask for gradients there, so an in-place
            activation applied to ``y`` later does not change what they get.
    """

    name: str
    module: nn.Module
    weight: Tensor | None
    bias: Tensor | None
    gamma: Tensor | None = None
    output: Tensor | None = None
    mean: Tensor | None = None
    inv_std: Tensor | None = None
    xhat: Tensor | None = None
    sums: tuple[list[Tensor], list[Tensor]] = field(default_factory=lambda: ([], []))
    calls: int = 0
    batch_stats: bool = True
    input: Tensor | None = None
    target: GradientEdge | None = None

    @property
    def params(self) -> list[Tensor]:
        """The selected affine parameters, ``γ`` first."""
        return [p for p in (self.weight, self.bias) if p is not None]

    @property
    def channels(self) -> int:
        """``K``."""
        return self.module.num_features

    @property
    def num_statistics(self) -> int:
        """``2K`` with batch statistics (``μ`` and ``r``); 0 with running statistics."""
        return 2 * self.channels if self.batch_stats else 0

    def coefficients(self) -> Tensor:
        """``W_l = ∂_{(μ,r)} F̃ᵀ S``, ``[2K, NC]``: rows ``μ_1…μ_K``, then ``r_1…r_K``.

        ``∂y/∂μ_k = −γ_k r_k`` and ``∂y/∂r_k = γ_k (x − μ_k) = (γ_k / r_k) x̂``, summed
        against each column's frozen cotangent.
        """
        s_delta, s_dx = (torch.cat(s) for s in self.sums)  # [NC, K] each
        if not self.batch_stats:
            return s_delta.new_zeros(0, s_delta.shape[0])
        r = self.inv_std.detach()
        w_mean = -(self.gamma * r) * s_delta
        w_r = (self.gamma / r) * s_dx
        return torch.cat([w_mean, w_r], dim=1).T

    def affine_rows(self) -> list[Tensor]:
        """Frozen per-column rows of the selected ``γ`` (``Σ δ x̂``) and ``β`` (``Σ δ``)."""
        s_delta, s_dx = (torch.cat(s) for s in self.sums)
        rows = []
        if self.weight is not None:
            rows.append(s_dx)
        if self.bias is not None:
            rows.append(s_delta)
        return rows


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm module that the capture recomputes."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and not isinstance(m, nn.SyncBatchNorm)
        for m in model.modules()
    )


def batch_norm_layers(model: nn.Module, selected: set[int]) -> list[BNLayer]:
    """Every BatchNorm module (``SyncBatchNorm`` excluded), flagged by its statistics.

    Running-statistics (eval-mode) layers are recomputed too, so that their affine
    parameters get per-column rows under the frozen passes.
    """
    found = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(
            m, nn.SyncBatchNorm
        ):
            continue
        w, b = m.weight, m.bias
        found.append(
            BNLayer(
                module_label(name),
                m,
                w if w is not None and id(w) in selected else None,
                b if b is not None and id(b) in selected else None,
                batch_stats=uses_batch_statistics(m),
            )
        )
    return found


def _bound_batch_norm(args: tuple, kwargs: dict) -> dict:
    """``F.batch_norm``'s arguments by name (its signature, defaults filled in)."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training")
    names += ("momentum", "eps")
    bound = {"weight": None, "bias": None, "training": False, "momentum": 0.1}
    bound["eps"] = 1e-5
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


class _BatchNorm(torch.autograd.Function):
    r"""``y = γ ⊙ (x − μ) r + β`` with ``μ``, ``r`` outputs too, and a fused backward.

    Forward: the batch statistics over all dimensions but the channels (biased
    variance), ``x̂ = (x − μ) r`` (returned, not differentiable) and ``y``. Backward
    for a cotangent ``δ`` of ``y``: while the switch is frozen ``γ r δ``; else the
    full derivative through the statistics, one native BatchNorm backward kernel.
    Cotangents of ``μ`` and ``r`` themselves (backward passes started there) add
    ``g_μ / n − r² x̂ g_r / n`` per channel (``n = N·P``). The backward runs in
    differentiable operations (double backward works) and vmaps (batched
    cotangents).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        switch: FreezeSwitch,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = x.mean(dims)
        inv_std = torch.rsqrt(x.var(dims, unbiased=False) + eps)
        xhat = (x - mean.view(shape)) * inv_std.view(shape)
        y = xhat * weight.view(shape) if weight is not None else xhat.clone()
        if bias is not None:
            y = y + bias.view(shape)
        return y, mean, inv_std, xhat

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _, eps, switch = inputs
        _, mean, inv_std, xhat = output
        ctx.save_for_backward(x, weight, mean, inv_std, xhat)
        ctx.mark_non_differentiable(xhat)
        ctx.set_materialize_grads(False)
        ctx.eps, ctx.switch = eps, switch

    @staticmethod
    def backward(
        ctx, g: Tensor | None, g_mean: Tensor | None, g_r: Tensor | None, _
    ) -> tuple[Tensor | None, ...]:
        x, weight, mean, r, xhat = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        live = not ctx.switch.frozen
        gx = gw = gb = None
        if g is not None and live:
            # the statistics are detached: the kernel differentiates through them
            # itself (and so does its double backward)
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                g,
                x,
                weight,
                None,
                None,
                mean.detach(),
                r.detach(),
                True,
                ctx.eps,
                [need_x, need_w and weight is not None, need_b],
            )
        elif g is not None:  # frozen statistics: γ r δ per sample
            scale = r if weight is None else weight * r
            gx = g * scale.view(shape) if need_x else None
            gw = (g * xhat).sum(dims) if need_w else None
            gb = g.sum(dims) if need_b else None
        if live and need_x and (g_mean is not None or g_r is not None):
            n = x.numel() // x.shape[1]
            extra = x.new_zeros(x.shape) if gx is None else gx
            if g_mean is not None:
                extra = extra + (g_mean / n).view(shape)
            if g_r is not None:
                extra = extra + xhat * (-(r * r) * g_r / n).view(shape)
            gx = extra
        return gx, gw, gb, None, None


def recompute_batch_norm(bn: BNLayer, call: dict, switch: FreezeSwitch) -> Tensor:
    """``y = γ (x − μ) r + β`` with ``μ``, ``r`` as gated graph nodes.

    ``call``: the arguments of the module's ``F.batch_norm`` call
    (:func:`_bound_batch_norm`); ``x`` ``[N, K, *pos]`` -> ``y`` likewise. Fills
    ``bn``'s graph nodes and values. With batch statistics one autograd function
    with a fused backward (:class:`_BatchNorm`); with running statistics (constants)
    plain operations.
    """
    x, w, b, eps = call["input"], call["weight"], call["bias"], call["eps"]
    shape = [1, -1] + [1] * (x.dim() - 2)
    batch_stats = bool(call["training"]) or call["running_mean"] is None
    if batch_stats:
        y, mean, inv_std, xhat = _BatchNorm.apply(x, w, b, eps, switch)
    else:  # running statistics: constants
        mean = call["running_mean"].detach()
        inv_std = torch.rsqrt(call["running_var"].detach() + eps)
        xhat = (x - mean.view(shape)) * inv_std.view(shape)
        y = xhat
        if w is not None:
            y = y * w.view(shape)
        if b is not None:
            y = y + b.view(shape)
    bn.mean, bn.inv_std, bn.xhat, bn.output = mean, inv_std, xhat.detach(), y
    bn.input, bn.batch_stats = x, batch_stats
    bn.gamma = w.detach() if w is not None else torch.ones_like(mean).detach()
    bn.calls += 1
    return y


class BatchNormCalls:
    r"""Substitutes the recomputation for the ``F.batch_norm`` call of each BatchNorm.

    Called by the capture's function mode
    (:class:`~lowrank_ggn.core.engine.calls.ForwardCalls`) for every ``F.batch_norm``.

    The substitution happens at the functional call, inside the module's own
    ``forward``: whatever else that ``forward`` does (timm's ``BatchNormAct2d`` applies
    its activation and drop-path after the normalisation) stays in the graph. A call
    belongs to the innermost running BatchNorm module when it passes that module's own
    affine parameters and running statistics (weight standardisation's
    ``F.batch_norm`` of a convolution weight does not). The recomputed output is
    compared with the call's true output before it is used; a mismatch beyond
    round-off, or an input whose first dimension is not the batch of ``batch_size``
    samples, keeps the true output and leaves the layer uncaptured (:attr:`rejected`),
    so the function the model computes never changes.
    """

    def __init__(
        self, bns: list[BNLayer], switch: FreezeSwitch, batch_size: int | None = None
    ) -> None:
        self.by_module = {id(bn.module): bn for bn in bns}
        self.switch, self.batch_size = switch, batch_size
        self.stack: list[tuple[BNLayer, list[bool]]] = []
        self.rejected: dict[str, str] = {}

    def enter(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook of a BatchNorm module."""
        self.stack.append((self.by_module[id(module)], [False]))

    def leave(self, module: nn.Module, args: tuple, out: object) -> None:
        """Forward hook of a BatchNorm module."""
        self.stack.pop()

    def handle(self, func, args: tuple, kwargs: dict) -> Tensor:
        """``F.batch_norm(*args, **kwargs)``, or its checked recomputation."""
        if not self.stack:
            return func(*args, **kwargs)
        bn, seen = self.stack[-1]
        call = _bound_batch_norm(args, kwargs)
        m = bn.module
        mine = (
            not seen[0]
            and call["weight"] is m.weight
            and call["bias"] is m.bias
            and (call["running_mean"] is None or call["running_mean"] is m.running_mean)
            and isinstance(call["input"], Tensor)
        )
        if not mine:
            return func(*args, **kwargs)
        seen[0] = True
        N = self.batch_size
        if N is not None and (call["input"].dim() < 2 or call["input"].shape[0] != N):
            # tokens flattened into the batch dimension (LeViT): no per-sample rows
            self.rejected[bn.name] = "its input's first dimension is not the batch"
            bn.calls = -1
            return func(*args, **kwargs)
        y = recompute_batch_norm(bn, call, self.switch)  # reads running stats first
        actual = func(*args, **kwargs)  # updates them as the model would
        if not roundoff_close(y.detach(), actual.detach()):
            self.rejected[bn.name] = "recomputed normalisation differs from its output"
            bn.calls = -1  # never captured
            return actual
        # the model's own values, the recomputation's graph: later layers see
        # exactly what they see without the capture (tiny batch variances amplify
        # round-off downstream), backward passes see the gated statistics
        y = y + (actual - y).detach()
        bn.output = y
        bn.target = get_gradient_edge(y) if y.requires_grad else None
        return y


__all__ = [
    "BNLayer",
    "BatchNormCalls",
    "FreezeSwitch",
    "batch_norm_layers",
    "has_batch_norm",
    "recompute_batch_norm",
]
