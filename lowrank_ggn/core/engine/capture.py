r"""Capture of layer inputs, outputs and BatchNorm statistics in one forward pass.

Forward hooks on the modules record, during
:meth:`lowrank_ggn.core.linearization.Linearization.forward_with_graph`:

* for each captured layer (:class:`Layer`; which modules:
  :mod:`~lowrank_ggn.core.engine.layers`): its input (detached) and its output (in
  the graph), so that backward passes can ask for output gradients;
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

from lowrank_ggn.core.engine.layers import Kind, classify, make_operand, output_grad
from lowrank_ggn.core.engine.operands import Operand
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
    """A captured module (see :mod:`~lowrank_ggn.core.engine.layers`) and its data.

    Attributes:
        name: Qualified module name.
        module: The module.
        weight: Its weight if selected, else ``None``; likewise ``bias``.
        kind: How its operands are built.
        on_trust: Captured on the assumption that a custom ``forward`` computes what
            the base class's does (the self-check decides).
        calls: Arguments ``(args, kwargs)`` (tensors detached), one per call;
            ``outputs``: layer outputs in the graph (captured layers run once).
        operand: The input-side operand (:mod:`~lowrank_ggn.core.engine.operands`),
            built by :meth:`prepare`.
        grads: Per-column output gradients ``[NC, P, O]`` (local layers).
        explicit: Per-column rows ``[B, D_l]`` per chunk (mixing layers).
        local: Whether output gradients vanish off each column's own sample.
    """

    name: str
    module: nn.Module
    weight: Tensor | None
    bias: Tensor | None
    kind: Kind = Kind.LINEAR
    on_trust: bool = False
    calls: list[tuple[tuple, dict]] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    operand: Operand | None = None
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

    def prepare(self) -> bool:
        """Build :attr:`operand` from the recorded call; ``False`` if unsupported."""
        if len(self.outputs) != 1:
            return False
        args, kwargs = self.calls[0]
        self.operand = make_operand(
            self.kind, self.module, args, kwargs, self.outputs[0]
        )
        return self.operand is not None

    def output_grad(self, g: Tensor) -> Tensor:
        """Output gradient ``[B, N, *out]`` -> ``[B, N, P, O]``."""
        return output_grad(self.module, g)

    def param_rows(self, g: Tensor, operand: Operand | None = None) -> list[Tensor]:
        """Rows ``[B, numel]`` of the selected parameters for gradients ``[B, N, P, O]``.

        Summed over the ``N`` samples of ``operand`` (default: the whole batch's).
        """
        operand = self.operand if operand is None else operand
        rows = []
        if self.weight is not None:
            rows.append(operand.weight_rows(g))
        if self.bias is not None:
            rows.append(g.sum(dim=(1, 2)))
        return rows

    def explicit_block(self, g: Tensor) -> Tensor:
        """Rows ``V_i`` of all selected parameters for gradients ``[B, N, P, O]``: ``[B, D_l]``."""
        return torch.cat(self.param_rows(g), dim=1)


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


def capturable(
    model: nn.Module, selected: set[int], excluded: frozenset[str] = frozenset()
) -> dict[str, tuple[nn.Module, Kind, bool]]:
    """Modules the engine captures: ``name -> (module, kind, on_trust)``.

    A module qualifies when :func:`~lowrank_ggn.core.engine.layers.classify` knows it,
    it holds a selected parameter, none of its parameters is shared with another
    module, and its name is not ``excluded``.
    """
    owners: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    found = {}
    for name, m in model.named_modules():
        kind = classify(m)
        params = list(m.parameters(recurse=False))
        if kind is None or name in excluded:
            continue
        if not any(id(p) in selected for p in params):
            continue
        if any(owners[id(p)] > 1 for p in params):
            continue
        found[name] = (m, *kind)
    return found


def captured_layers(
    model: nn.Module, selected: set[int], excluded: frozenset[str] = frozenset()
) -> list[Layer]:
    """A :class:`Layer` record for every :func:`capturable` module (selected params)."""

    def pick(p: Tensor | None) -> Tensor | None:
        return p if isinstance(p, Tensor) and id(p) in selected else None

    return [
        Layer(
            name,
            m,
            pick(getattr(m, "weight", None)),
            pick(getattr(m, "bias", None)),
            kind,
            trust,
        )
        for name, (m, kind, trust) in capturable(model, selected, excluded).items()
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

        def hook(mod, args, kwargs, out, layer=layer):
            def cut(v):
                return v.detach() if isinstance(v, Tensor) else v

            kept = {k: cut(v) for k, v in kwargs.items()}
            layer.calls.append((tuple(cut(a) for a in args), kept))
            layer.outputs.append(out)

        hooks.append(layer.module.register_forward_hook(hook, with_kwargs=True))
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
        excluded: Names of modules to leave generic.
    """

    def __init__(
        self,
        model: nn.Module,
        selected: set[int],
        with_bns: bool,
        forced_mixing: frozenset[str] = frozenset(),
        excluded: frozenset[str] = frozenset(),
    ) -> None:
        self.model, self.with_bns = model, with_bns
        self.forced_mixing, self.excluded = forced_mixing, excluded
        self.layers = captured_layers(model, selected, excluded)
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
        # a module called twice shares its weights across calls, one never called
        # has no record, one with unexpected shapes no formula: leave them generic
        self.layers = [la for la in self.layers if la.prepare()]
        self.bns = [bn for bn in self.bns if bn.calls == 1]
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
