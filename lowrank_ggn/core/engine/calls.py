r"""What the forward pass really calls: one function mode for the capture.

Module hooks see modules as their classes describe them; a ``TorchFunctionMode`` sees
the functional calls the forward pass makes, whichever module makes them. During the
capture's forward pass (:mod:`~lowrank_ggn.core.engine.capture`) :class:`ForwardCalls`

* hands every ``F.batch_norm`` to the BatchNorm handler
  (:class:`~lowrank_ggn.core.engine.batchnorm.BatchNormCalls`), which substitutes its
  checked recomputation inside the module's own ``forward`` (fused norm + activation
  modules keep their activation);
* records every linear map of a selected parameter that no module hook captures
  (:class:`FunctionalLinears`):

  ======================  =========================  ==================================
  call                    weight layout              who makes it
  ======================  =========================  ==================================
  ``F.linear(x, W, b)``   ``W`` ``[O, I]``           custom modules, ``Linear``
                                                     subclasses with their own forward
  ``torch.addmm(b, x, W)``  ``W`` ``[I, O]``         Hugging Face's ``Conv1D`` (GPT-2)
  ======================  =========================  ==================================

  ``y = x Wᵀ + b`` (or ``x W + b``) over any leading positions: the same operand as an
  ``nn.Linear`` (:class:`~lowrank_ggn.core.engine.operands.DenseOperand`, ``[I, O]``
  as its transposed layout). ``addmm`` flattens the positions into its rows
  (``[N·P, I]``): they are taken as sample-major. A parameter called more than once
  (tied weights, a layer reused at every depth: :attr:`ForwardCalls.uses`) is not
  captured, by a module hook or here: its rows need the cross terms of its uses, and
  it stays generic. Every recorded call is captured on
  trust: the engine's self-check compares the rows with autograd, parameter by
  parameter, and leaves exactly the mismatching ones generic.

The mode only observes: every call returns what the model computes (the BatchNorm
substitution carries the model's own values).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.overrides import TorchFunctionMode

from lowrank_ggn.core.engine.batchnorm import BatchNormCalls


@dataclass
class LinearCall:
    """One recorded linear call: ``y = x Wᵀ + b`` (``x W + b`` if ``io_layout``).

    Attributes:
        weight: The parameter ``W``; ``bias``: ``b`` if a selected parameter.
        io_layout: ``W`` is stored ``[I, O]`` (``addmm``).
        input: ``x`` ``[*, I]``, detached; ``output``: ``y`` in the graph; ``edge``:
            its gradient edge as computed.
    """

    weight: Tensor
    bias: Tensor | None
    io_layout: bool
    input: Tensor
    output: Tensor
    edge: GradientEdge | None


class FunctionalLinears:
    """Records linear calls whose weight is one of the parameters ``selected``."""

    def __init__(self, selected: set[int]) -> None:
        self.selected = selected
        self.calls: list[LinearCall] = []

    def handle(self, func, args: tuple, kwargs: dict, out: object) -> None:
        """Record ``out = func(*args, **kwargs)`` if it is a linear map of a parameter."""
        if func is F.linear:
            call = dict(zip(("input", "weight", "bias"), args), **kwargs)
            x, W, b, io = call.get("input"), call.get("weight"), call.get("bias"), False
        else:  # torch.addmm(input, mat1, mat2, *, beta=1, alpha=1)
            call = dict(zip(("input", "mat1", "mat2"), args), **kwargs)
            if call.get("beta", 1) != 1 or call.get("alpha", 1) != 1:
                return
            x, W, b, io = call.get("mat1"), call.get("mat2"), call.get("input"), True
        if not (isinstance(W, Tensor) and id(W) in self.selected and W.dim() == 2):
            return
        if not isinstance(x, Tensor) or not isinstance(out, Tensor):
            return
        bias = b if isinstance(b, Tensor) and id(b) in self.selected else None
        if bias is not None and bias.shape != out.shape[-1:]:
            bias = None
        edge = get_gradient_edge(out) if out.requires_grad else None
        self.calls.append(LinearCall(W, bias, io, x.detach(), out, edge))


#: The linear functions :class:`FunctionalLinears` records.
LINEAR_FUNCTIONS = (F.linear, torch.addmm)


class ForwardCalls(TorchFunctionMode):
    """The capture's function mode: BatchNorm substitution, linear calls, uses.

    Attributes:
        uses: ``id(p) -> `` how many differentiable calls read the parameter ``p``
            (one of ``tracked``) directly: more than one means tied weights or a
            layer run several times, whose rows need the cross terms of the uses.
    """

    def __init__(
        self,
        bns: BatchNormCalls | None,
        linears: FunctionalLinears | None,
        tracked: set[int],
    ) -> None:
        super().__init__()
        self.bns, self.linears, self.tracked = bns, linears, tracked
        self.uses: Counter[int] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm and self.bns is not None:
            out = self.bns.handle(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
            if self.linears is not None and func in LINEAR_FUNCTIONS:
                self.linears.handle(func, args, kwargs, out)
        outs = out if isinstance(out, (list, tuple)) else (out,)
        if any(isinstance(o, Tensor) and o.requires_grad for o in outs):  # not metadata
            for a in (*args, *kwargs.values()):
                for t in a if isinstance(a, (list, tuple)) else (a,):
                    if isinstance(t, Tensor) and id(t) in self.tracked:
                        self.uses[id(t)] += 1
        return out


__all__ = ["LINEAR_FUNCTIONS", "ForwardCalls", "FunctionalLinears", "LinearCall"]
