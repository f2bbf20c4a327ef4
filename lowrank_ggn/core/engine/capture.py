r"""Capture of layer inputs and outputs in one forward pass.

Forward hooks on the modules record, during
:meth:`lowrank_ggn.core.linearization.Linearization.forward_with_graph`:

* for each captured layer (:class:`Layer`; which modules:
  :mod:`~lowrank_ggn.core.engine.layers`): its input (detached) and its output (in
  the graph), so that backward passes can ask for output gradients;
* for each BatchNorm (:class:`~lowrank_ggn.core.engine.batchnorm.BNLayer`): its
  output, recomputed with the statistics ``μ``, ``r`` as graph nodes gated by a
  :class:`~lowrank_ggn.core.engine.batchnorm.FreezeSwitch`
  (:mod:`~lowrank_ggn.core.engine.batchnorm`).

:class:`ForwardCapture` bundles both with the order in which modules first ran.
Hooks are removed when the forward pass ends; the module itself is never changed.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from lowrank_ggn.core.engine.batchnorm import (
    BatchNormCalls,
    BNLayer,
    FreezeSwitch,
    batch_norm_layers,
)
from lowrank_ggn.core.engine.calls import ForwardCalls, FunctionalCalls
from lowrank_ggn.core.engine.layers import (
    Kind,
    classify,
    linear_call_operand,
    make_operand,
    output_grad,
    scale_call_operand,
)
from lowrank_ggn.core.engine.operands import Operand


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
            ``outputs``: layer outputs in the graph (captured layers run once);
            ``edges``: their gradient edges as computed (``None`` where no
            gradient flows), where backward passes ask for output gradients, so
            that an in-place operation on an output later (``ReLU(inplace=True)``)
            does not change what they get.
        operand: The input-side operand (:mod:`~lowrank_ggn.core.engine.operands`),
            built by :meth:`prepare`.
        grads: Per-column output gradients ``[NC, P, O]`` (local layers).
        explicit: Per-column rows ``[B, D_l]`` per chunk (mixing layers).
        local: Whether output gradients vanish off each column's own sample.
        functional: Recorded from a call, not a module hook
            (:mod:`~lowrank_ggn.core.engine.calls`): a linear map (``kind`` LINEAR;
            ``io_layout``: its weight is stored ``[I, O]``, ``addmm``), or an
            elementwise affine with broadcast parameters (``kind`` NORM; ``perm``
            orders the output's dimensions broadcast ones first).
        batch: ``N``, the batch the operand was built for.
        shared: ``id`` of its parameters that other captured calls read too (tied
            weights, a layer run several times): their rows are summed over the
            uses before the Gram (:mod:`~lowrank_ggn.core.engine.assemble`).
    """

    name: str
    module: nn.Module
    weight: Tensor | None
    bias: Tensor | None
    kind: Kind = Kind.LINEAR
    on_trust: bool = False
    calls: list[tuple[tuple, dict]] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    edges: list[GradientEdge | None] = field(default_factory=list)
    operand: Operand | None = None
    grads: list[Tensor] = field(default_factory=list)
    explicit: list[Tensor] = field(default_factory=list)
    local: bool = True
    functional: bool = False
    io_layout: bool = False
    perm: tuple[int, ...] = ()
    batch: int = 0
    shared: frozenset[int] = frozenset()

    @property
    def params(self) -> list[Tensor]:
        """The selected parameters, weight first."""
        return [p for p in (self.weight, self.bias) if p is not None]

    @property
    def target(self) -> GradientEdge | Tensor:
        """Where a backward pass finds the output gradient: the recorded edge."""
        return self.edges[0] if self.edges and self.edges[0] is not None else (
            self.outputs[0]
        )

    def grad_matrix(self) -> Tensor:
        """Output gradients of all columns, ``[NC, P, O]`` (one tensor)."""
        if len(self.grads) > 1:
            self.grads = [torch.cat(self.grads)]
        return self.grads[0]

    def prepare(self, batch_size: int) -> bool:
        """Build :attr:`operand` from the recorded call; ``False`` if unsupported.

        Unsupported: a module called more or less than once, arguments without a
        formula, outputs whose leading dimension is not the batch (a functional
        linear call's rows may hold the positions too, sample-major).
        """
        if len(self.outputs) != 1:
            return False
        args, kwargs = self.calls[0]
        y = self.outputs[0]
        self.batch = batch_size
        if self.functional and self.kind is Kind.LINEAR:
            call = args[0]  # a LinearCall
            self.io_layout = call.io_layout
            self.operand = linear_call_operand(call.input, y, batch_size, call.io_layout)
        elif self.functional:
            call = args[0]  # a ScaleCall
            found = scale_call_operand(call.xhat, call.shape, y, batch_size)
            if found is not None:
                self.operand, self.perm = found
        elif isinstance(y, Tensor) and y.dim() and y.shape[0] == batch_size:
            self.operand = make_operand(self.kind, self.module, args, kwargs, y)
        return self.operand is not None

    def output_grad(self, g: Tensor) -> Tensor:
        """Output gradient ``[B, N, *out]`` (functional: ``[B, N·P, O]``) -> ``[B, N, P, O]``."""
        if self.functional and self.kind is Kind.LINEAR:
            return g.reshape(g.shape[0], self.batch, -1, g.shape[-1])
        if self.functional:  # broadcast dimensions, then the parameter's
            moved = g.permute(0, *(d + 1 for d in self.perm))
            return moved.reshape(g.shape[0], self.batch, -1, self.operand.width)
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


def capturable(
    model: nn.Module,
    selected: set[int],
    excluded: frozenset[str] = frozenset(),
    allow_shared: bool = False,
) -> dict[str, tuple[nn.Module, Kind, bool]]:
    """Modules the engine captures: ``name -> (module, kind, on_trust)``.

    ``allow_shared``: keep modules that share a parameter with another module (the
    capture then checks that every use of it is captured: tied weights).

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
        if not allow_shared and any(owners[id(p)] > 1 for p in params):
            continue
        found[name] = (m, *kind)
    return found


def captured_layers(
    model: nn.Module,
    selected: set[int],
    excluded: frozenset[str] = frozenset(),
    allow_shared: bool = False,
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
        for name, (m, kind, trust) in capturable(
            model, selected, excluded, allow_shared
        ).items()
    ]


@contextmanager
def capture(
    layers: list[Layer],
    bns: list[BNLayer],
    switch: FreezeSwitch | None = None,
    recorder: FunctionalCalls | None = None,
    tracked: set[int] | None = None,
) -> Iterator[ForwardCalls | None]:
    """Record layer inputs/outputs (and recompute BatchNorm) during the block.

    Module hooks record the ``layers``; the function mode
    (:class:`~lowrank_ggn.core.engine.calls.ForwardCalls`) substitutes BatchNorm's
    checked recomputation, records linear and elementwise calls (``recorder``) and
    counts the uses of the
    ``tracked`` parameters. Yields the mode (``None`` if it has nothing to do).
    """
    hooks = []
    for layer in layers:

        def hook(mod, args, kwargs, out, layer=layer):
            def cut(v):
                return v.detach() if isinstance(v, Tensor) else v

            kept = {k: cut(v) for k, v in kwargs.items()}
            layer.calls.append((tuple(cut(a) for a in args), kept))
            layer.outputs.append(out)
            live = isinstance(out, Tensor) and out.requires_grad
            layer.edges.append(get_gradient_edge(out) if live else None)

        hooks.append(layer.module.register_forward_hook(hook, with_kwargs=True))
    bn_calls = BatchNormCalls(bns, switch or FreezeSwitch()) if bns else None
    for bn in bns:
        hooks.append(bn.module.register_forward_pre_hook(bn_calls.enter))
        hooks.append(bn.module.register_forward_hook(bn_calls.leave, always_call=True))
    active = bns or recorder is not None or tracked
    mode = ForwardCalls(bn_calls, recorder, tracked or set()) if active else None
    try:
        if mode is None:
            yield None
        else:
            with mode:
                yield mode
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
        self.selected = selected
        self.forced_mixing, self.excluded = forced_mixing, excluded
        self.layers = captured_layers(model, selected, excluded, allow_shared=True)
        self.bns = batch_norm_layers(model, selected) if with_bns else []
        self.switch = FreezeSwitch()
        self.order: dict[int, int] = {}
        self.seconds = 0.0
        self.done = False
        #: Layers left uncaptured after a failed check of what they compute -> why.
        self.rejected: dict[str, str] = {}
        #: The least precise floating dtype the forward pass computed in.
        self.precision: torch.dtype | None = None

    @contextmanager
    def recording(self, batch_size: int) -> Iterator[None]:
        """Capture during the block (one forward pass of ``batch_size`` samples)."""
        start = time.perf_counter()

        def first_call(mod, inp) -> None:
            self.order.setdefault(id(mod), len(self.order))

        hooks = [m.register_forward_pre_hook(first_call) for m in self.model.modules()]
        recorder = FunctionalCalls(self.selected)
        try:
            with capture(
                self.layers, self.bns, self.switch, recorder, self.selected
            ) as mode:
                yield
        finally:
            for h in hooks:
                h.remove()
        self.seconds = time.perf_counter() - start
        if mode.bns is not None:
            self.rejected.update(mode.bns.rejected)
        self.precision = mode.lowest
        # a module called twice shares its weights across calls, one never called
        # has no record, one with unexpected shapes no formula: leave them generic
        self.layers = [la for la in self.layers if la.prepare(batch_size)]
        self.layers += self._functional_layers(recorder, batch_size)
        # every differentiable read of a parameter must be a captured call: one
        # (its layer's) or several (tied, reused: shared rows, summed over uses)
        sites = Counter(id(p) for la in self.layers for p in la.params)
        for la in self.layers:
            if any(mode.uses[id(p)] != sites[id(p)] for p in la.params):
                self.rejected[la.name] = "a parameter is also read outside it"
        self.layers = [la for la in self.layers if la.name not in self.rejected]
        sites = Counter(id(p) for la in self.layers for p in la.params)
        for la in self.layers:
            la.local = la.name not in self.forced_mixing
            la.shared = frozenset(id(p) for p in la.params if sites[id(p)] > 1)
            self.order.setdefault(id(la.module), len(self.order))
        self.bns = [bn for bn in self.bns if bn.calls == 1]
        self.done = True

    def _functional_layers(
        self, recorder: FunctionalCalls, batch_size: int
    ) -> list[Layer]:
        """Layers for the recorded calls that are not a captured module's own call."""
        own = {id(la.outputs[0]) for la in self.layers}
        bn_params = {id(p) for bn in self.bns for p in bn.params}
        names, owners = {}, {}
        for mod_name, m in self.model.named_modules():
            for p_name, p in m.named_parameters(recurse=False):
                names.setdefault(id(p), f"{mod_name}.{p_name}" if mod_name else p_name)
                owners.setdefault(id(p), m)
        used = {la.name for la in self.layers}
        found = []
        records = [(c, Kind.LINEAR) for c in recorder.linear]
        records += [(c, Kind.NORM) for c in recorder.scale]
        for c, kind in records:
            if id(c.output) in own:
                continue
            w, b = (None if p is None or id(p) in bn_params else p for p in c.params)
            if kind is Kind.LINEAR and w is None or w is None and b is None:
                continue
            first = w if w is not None else b
            name = names[id(first)].removesuffix(".weight").removesuffix(".bias")
            for k in range(len(found) + len(used) + 1):  # a call site per name
                candidate = name if k == 0 else f"{name}#{k}"
                if candidate not in used:
                    name = candidate
                    break
            if name.split("#")[0] in self.excluded or name in self.excluded:
                continue
            la = Layer(name, owners[id(first)], w, b, kind, on_trust=True)
            la.functional, la.calls = True, [((c,), {})]
            la.outputs, la.edges = [c.output], [c.edge]
            if la.prepare(batch_size):
                found.append(la)
                used.add(name)
        return found


__all__ = [
    "ForwardCapture",
    "Layer",
    "capturable",
    "capture",
    "captured_layers",
]
