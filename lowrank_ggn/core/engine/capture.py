r"""Capture of layer inputs, outputs and BatchNorm statistics in one forward pass.

Forward hooks on the modules record, during
:meth:`lowrank_ggn.core.linearization.Linearization.forward_with_graph`:

* for each captured ``Linear``/``Conv2d`` (:class:`Layer`): its input (detached) and
  its output (in the graph), so that backward passes can ask for output gradients;
* for each BatchNorm that normalises with batch statistics (:class:`BNLayer`,
  :attr:`~lowrank_ggn.core.engine.report.Strategy.BN_SPLIT` only): the module's output is
  recomputed as

  .. math::
      y = γ ⊙ (x − μ) ⊙ r + β, \qquad μ = \operatorname{mean}(x), \quad
      r = (\operatorname{var}(x) + ε)^{-1/2}

  (per channel, over the batch and all positions; biased variance, as PyTorch does in
  train mode), with ``μ`` and ``r`` kept as graph nodes. A :class:`FreezeSwitch` gates
  the gradients that flow into them: while frozen, backward passes see the network
  with its statistics held fixed, which is sample-independent.

Hooks are removed when the forward pass ends; the module itself is never changed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.functional import unfold

from lowrank_ggn.core.engine.accumulate import weight_rows
from lowrank_ggn.core.paths import uses_batch_statistics


class FreezeSwitch:
    """Gate for the gradients into BatchNorm statistics: zero while :attr:`frozen`."""

    def __init__(self) -> None:
        self.frozen = False

    def gate(self, grad: Tensor) -> Tensor:
        """Tensor hook: pass ``grad`` on, or zero it while frozen."""
        return torch.zeros_like(grad) if self.frozen else grad

    @contextmanager
    def freeze(self) -> Iterator[None]:
        """Backward passes inside this block hold the statistics fixed."""
        self.frozen = True
        try:
            yield
        finally:
            self.frozen = False


@dataclass
class Layer:
    """A captured ``Linear``/``Conv2d`` and the data the backward passes find for it.

    Attributes:
        name: Qualified module name.
        module: The module.
        weight: Its weight if selected, else ``None``; likewise ``bias``.
        outputs: Layer outputs in the graph (one per call; captured layers run once).
        A: Layer input ``[N, P, I]`` (unfolded for convolutions).
        grads: Per-column output gradients ``[NC, P, O]`` (local layers).
        explicit: Per-column rows ``[B, D_l]`` per chunk (mixing layers).
        local: Whether output gradients vanish off each column's own sample.
    """

    name: str
    module: nn.Module
    weight: Tensor | None
    bias: Tensor | None
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    A: Tensor | None = None
    grads: list[Tensor] = field(default_factory=list)
    explicit: list[Tensor] = field(default_factory=list)
    local: bool = True

    @property
    def params(self) -> list[Tensor]:
        """The selected parameters, weight first."""
        return [p for p in (self.weight, self.bias) if p is not None]

    def grad_matrix(self) -> Tensor:
        """Output gradients of all columns, ``[NC, P, O]`` (one tensor)."""
        if len(self.grads) > 1:
            self.grads = [torch.cat(self.grads)]
        return self.grads[0]

    def layer_input(self) -> Tensor:
        """``A`` ``[N, P, I]``: unfolded for convolutions, positions for Linear."""
        x, m = self.inputs[0], self.module
        if isinstance(m, nn.Conv2d):
            cols = unfold(
                x, m.kernel_size, m.dilation, m.padding, m.stride
            )  # [N, I, P]
            return cols.transpose(1, 2)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def output_grad(self, g: Tensor) -> Tensor:
        """Output gradient ``[B, N, *out]`` -> ``[B, N, P, O]``."""
        if isinstance(self.module, nn.Conv2d):
            return g.flatten(3).transpose(2, 3)
        return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])

    def explicit_block(self, g: Tensor) -> Tensor:
        """Rows ``V_i = Σ_n g_{i,n}ᵀ A_n`` for gradients ``g`` ``[B, N, P, O]``: ``[B, D_l]``."""
        blocks = []
        if self.weight is not None:
            w = weight_rows(g, self.A)
            blocks.append(w.reshape(g.shape[0], -1))
        if self.bias is not None:
            blocks.append(g.sum(dim=(1, 2)))
        return torch.cat(blocks, dim=1)


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


def capturable(model: nn.Module, selected: set[int]) -> dict[str, nn.Module]:
    """``Linear``/zero-padded ``Conv2d`` modules with selected, unshared parameters."""
    owners: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            ok = (
                m.groups == 1
                and m.padding_mode == "zeros"
                and not isinstance(m.padding, str)
            )
        else:
            ok = type(m) is nn.Linear
        params = list(m.parameters(recurse=False))
        if not ok or not any(id(p) in selected for p in params):
            continue
        if any(owners[id(p)] > 1 for p in params):
            continue
        found[name] = m
    return found


def captured_layers(model: nn.Module, selected: set[int]) -> list[Layer]:
    """A :class:`Layer` record for every :func:`capturable` module (selected params)."""
    return [
        Layer(
            name,
            m,
            m.weight if id(m.weight) in selected else None,
            m.bias if m.bias is not None and id(m.bias) in selected else None,
        )
        for name, m in capturable(model, selected).items()
    ]


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
                name or "<root>",
                m,
                w if w is not None and id(w) in selected else None,
                b if b is not None and id(b) in selected else None,
                batch_stats=uses_batch_statistics(m),
            )
        )
    return found


def _recompute_bn(bn: BNLayer, x: Tensor, switch: FreezeSwitch) -> Tensor:
    """``y = γ (x − μ) r + β`` with ``μ``, ``r`` as gated graph nodes."""
    m = bn.module
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if not bn.batch_stats:  # running statistics: constants
        mean = m.running_mean.detach()
        inv_std = torch.rsqrt(m.running_var.detach() + m.eps)
    else:
        mean = x.mean(dims)
        inv_std = torch.rsqrt(x.var(dims, unbiased=False) + m.eps)
    if mean.requires_grad:
        mean.register_hook(switch.gate)
        inv_std.register_hook(switch.gate)
    xhat = (x - mean.view(shape)) * inv_std.view(shape)
    y = xhat
    if m.weight is not None:
        y = y * m.weight.view(shape) + m.bias.view(shape)
    bn.mean, bn.inv_std, bn.xhat, bn.output = mean, inv_std, xhat.detach(), y
    bn.input = x
    gamma = m.weight.detach() if m.weight is not None else torch.ones_like(mean)
    bn.gamma = gamma.detach()
    bn.calls += 1
    return y


@contextmanager
def capture(
    layers: list[Layer], bns: list[BNLayer], switch: FreezeSwitch | None = None
) -> Iterator[None]:
    """Record layer inputs/outputs (and recompute BatchNorm) during the block."""
    hooks = []
    for layer in layers:

        def hook(mod, inp, out, layer=layer):
            layer.inputs.append(inp[0].detach())
            layer.outputs.append(out)

        hooks.append(layer.module.register_forward_hook(hook))
    for bn in bns:

        def bn_hook(mod, inp, out, bn=bn):
            return _recompute_bn(bn, inp[0], switch)

        hooks.append(bn.module.register_forward_hook(bn_hook))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


class ForwardCapture:
    """The engine's view of one forward pass: layers, BatchNorm nodes, module order.

    Built before the pass, filled by :meth:`recording`, consumed by one engine run.
    The linearisation runs its graph forward pass inside :meth:`recording`, so the
    Gram engine needs no forward pass of its own.

    Args:
        model: The module.
        selected: ``id`` of the selected parameters.
        with_bns: Recompute BatchNorm modules with their statistics as graph nodes
            (needed on the full-batch path and for ``bn_split``).
        forced_mixing: Names of layers to treat as sample-mixing.
    """

    def __init__(
        self,
        model: nn.Module,
        selected: set[int],
        with_bns: bool,
        forced_mixing: frozenset[str] = frozenset(),
    ) -> None:
        self.model, self.with_bns = model, with_bns
        self.forced_mixing = forced_mixing
        self.layers = captured_layers(model, selected)
        for la in self.layers:
            la.local = la.name not in forced_mixing
        self.bns = batch_norm_layers(model, selected) if with_bns else []
        self.switch = FreezeSwitch()
        self.order: dict[int, int] = {}
        self.seconds = 0.0
        self.done = False

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Capture during the block (one forward pass of the whole batch)."""
        start = time.perf_counter()

        def first_call(mod, inp) -> None:
            self.order.setdefault(id(mod), len(self.order))

        hooks = [m.register_forward_pre_hook(first_call) for m in self.model.modules()]
        try:
            with capture(self.layers, self.bns, self.switch):
                yield
        finally:
            for h in hooks:
                h.remove()
        self.seconds = time.perf_counter() - start
        # a module called twice shares its weights across calls: leave it generic
        self.layers = [la for la in self.layers if len(la.outputs) == 1]
        self.bns = [bn for bn in self.bns if bn.calls == 1]
        for la in self.layers:
            la.A = la.layer_input()
        self.done = True


__all__ = [
    "BNLayer",
    "ForwardCapture",
    "has_batch_norm",
    "FreezeSwitch",
    "Layer",
    "batch_norm_layers",
    "capturable",
    "capture",
    "captured_layers",
]
