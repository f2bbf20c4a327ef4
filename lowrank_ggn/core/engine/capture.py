r"""Capture of layer inputs and outputs in one forward pass.

During :meth:`lowrank_ggn.core.linearization.Linearization.forward_with_graph`:

* forward hooks on the captured modules (which: :mod:`~lowrank_ggn.core.engine.layers`)
  record each one's input (detached), output (in the graph) and the output's gradient
  edge (:class:`~lowrank_ggn.core.engine.layer.Layer`);
* the function mode of :mod:`~lowrank_ggn.core.engine.calls` substitutes each
  BatchNorm's ``F.batch_norm`` by its recomputation with the statistics ``μ``, ``r``
  as graph nodes gated by a :class:`~lowrank_ggn.core.engine.batchnorm.FreezeSwitch`
  (:mod:`~lowrank_ggn.core.engine.batchnorm`), records the linear and elementwise
  calls no module hook sees, and counts every parameter's reads.

:class:`ForwardCapture` turns that into the engine's layers: a parameter is captured
only where every read of it is a captured call (several: ``shared`` rows). Hooks and
the mode end with the forward pass; the module itself is never changed.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from lowrank_ggn.core.engine.batchnorm import (
    BatchNormCalls,
    BNLayer,
    FreezeSwitch,
    batch_norm_layers,
)
from lowrank_ggn.core.engine.calls import ForwardCalls, FunctionalCalls
from lowrank_ggn.core.engine.layer import Layer
from lowrank_ggn.core.engine.layers import Kind, classify


def capturable(
    model: nn.Module,
    selected: set[int],
    excluded: frozenset[str] = frozenset(),
    allow_shared: bool = False,
) -> dict[str, tuple[nn.Module, Kind, bool]]:
    """Modules the engine captures: ``name -> (module, kind, on_trust)``.

    A module qualifies when :func:`~lowrank_ggn.core.engine.layers.classify` knows it,
    it holds a selected parameter, its name is not ``excluded``, and none of its
    parameters is shared with another module unless ``allow_shared`` (the capture then
    checks that every use of it is captured: tied weights).
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
    batch_size: int | None = None,
) -> Iterator[ForwardCalls | None]:
    """Record layer inputs/outputs (and recompute BatchNorm) during the block.

    Module hooks record the ``layers``; the function mode
    (:class:`~lowrank_ggn.core.engine.calls.ForwardCalls`) substitutes BatchNorm's
    checked recomputation, records linear and elementwise calls (``recorder``) and
    counts the uses of the ``tracked`` parameters. Yields the mode (``None`` if it has
    nothing to do).
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
    bn_calls = (
        BatchNormCalls(bns, switch or FreezeSwitch(), batch_size) if bns else None
    )
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
                self.layers, self.bns, self.switch, recorder, self.selected, batch_size
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
            base = names[id(first)].removesuffix(".weight").removesuffix(".bias")
            # one name per call site: a layer run k times gives base, base#1, …
            name = next(
                n
                for k in range(len(used) + 1)
                if (n := f"{base}#{k}" if k else base) not in used
            )
            if base in self.excluded or name in self.excluded:
                continue
            la = Layer(name, owners[id(first)], w, b, kind, on_trust=True)
            la.functional, la.calls = True, [((c,), {})]
            la.outputs, la.edges = [c.output], [c.edge]
            if la.prepare(batch_size):
                found.append(la)
                used.add(name)
        return found


@dataclass(frozen=True)
class Captured:
    """What one engine run's forward pass gives its later stages.

    Returned by the run's forward pass, passed to its plan and backward passes.

    Attributes:
        out: The model's outputs, with the graph every backward pass shares.
        cap: The filled capture (``.layers``, ``.bns``, ``.switch``, ``.order``).
        generic: The selected parameters of no captured layer.
        non_bn_generic: Those of them in no BatchNorm module either.
    """

    out: Tensor
    cap: ForwardCapture
    generic: list[Tensor]
    non_bn_generic: list[Tensor]

    @classmethod
    def of(cls, out: Tensor, cap: ForwardCapture, params: list[Tensor]) -> Captured:
        """Sort ``params`` by whether ``cap`` captured them."""
        captured = {id(p) for la in cap.layers for p in la.params}
        bn_params = {id(p) for bn in cap.bns for p in bn.params}
        generic = [p for p in params if id(p) not in captured]
        return cls(out, cap, generic, [p for p in generic if id(p) not in bn_params])

    @property
    def layers(self) -> list[Layer]:
        """The captured layers."""
        return self.cap.layers

    @property
    def bns(self) -> list[BNLayer]:
        """The BatchNorm modules recomputed with their statistics as graph nodes."""
        return self.cap.bns


__all__ = [
    "Captured",
    "ForwardCapture",
    "capturable",
    "capture",
    "captured_layers",
]
