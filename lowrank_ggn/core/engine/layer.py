r"""The record of one captured layer: its call, output, operand and per-column rows.

A :class:`Layer` is filled by the capture (:mod:`~lowrank_ggn.core.engine.capture`:
a module hook, or a recorded call of :mod:`~lowrank_ggn.core.engine.calls`), gets its
operand from :meth:`Layer.prepare` (:mod:`~lowrank_ggn.core.engine.layers`) and
receives its output gradients from the backward passes
(:mod:`~lowrank_ggn.core.engine.backprop`); the Gram assembly and the self-check read
its rows (:meth:`Layer.param_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from lowrank_ggn.core.engine.layers import (
    Kind,
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
            an ``addmm`` weight stored ``[I, O]`` as the transposed layout), or an
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
        return (
            self.edges[0]
            if self.edges and self.edges[0] is not None
            else (self.outputs[0])
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
            self.operand = linear_call_operand(
                call.input, y, batch_size, call.io_layout
            )
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


__all__ = ["Layer"]
