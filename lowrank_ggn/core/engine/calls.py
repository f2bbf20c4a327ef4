r"""What the forward pass really calls: one function mode for the capture.

Module hooks see modules as their classes describe them; a ``TorchFunctionMode`` sees
the functional calls the forward pass makes, whichever module makes them. During the
capture's forward pass (:mod:`~lowrank_ggn.core.engine.capture`), :class:`ForwardCalls`

* hands every ``F.batch_norm`` to the BatchNorm handler
  (:class:`~lowrank_ggn.core.engine.batchnorm.BatchNormCalls`), which substitutes its
  checked recomputation inside the module's own ``forward`` (fused norm + activation
  modules keep their activation);
* records, through :class:`FunctionalCalls`, the calls of selected parameters whose
  rows have a closed form:

  ==========================  ==============================  ==========================
  call                        parameters                      who makes it
  ==========================  ==============================  ==========================
  ``F.linear(x, W, b)``       ``W`` ``[O, I]``, ``b``         custom modules, ``Linear``
                                                              subclasses
  ``torch.addmm(b, x, W)``    ``W`` ``[I, O]``, ``b``         Hugging Face's ``Conv1D``
  ``F.layer_norm`` …          the affine ``γ``, ``β``          timm's ``LayerNorm2d``
  ``x * p``, ``x + p``        ``p`` broadcast (or a view,     layer scale, RMS norms,
                              ``p[:T]`` of all of ``p``)      position tables
  ==========================  ==============================  ==========================

  A linear call is the operand of an ``nn.Linear``
  (:class:`~lowrank_ggn.core.engine.operands.DenseOperand`, ``[I, O]`` as its
  transposed layout); ``addmm`` flattens the positions into its rows (``[N·P, I]``),
  taken as sample-major. An elementwise call is an
  :class:`~lowrank_ggn.core.engine.operands.ElementwiseOperand`;
* counts every differentiable read of each parameter (:attr:`ForwardCalls.uses`): the
  capture keeps a parameter only where every read is a captured call (several reads:
  tied weights, a reused layer, whose rows are summed over the reads).

Every recorded call is captured on trust: the engine's self-check compares the rows
with autograd, parameter by parameter, and leaves exactly the mismatching ones
generic. The mode only observes: every call returns what the model computes (the
BatchNorm substitution carries the model's own values). Calls made inside another
function the mode sees are not seen, except in ``F.multi_head_attention_forward``,
whose self-attention projections :mod:`~lowrank_ggn.core.engine.attention` opens up.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.overrides import TorchFunctionMode

from lowrank_ggn.core.engine.attention import ATTENTION, open_attention
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

    @property
    def params(self) -> tuple[Tensor | None, Tensor | None]:
        """``(weight, bias)``."""
        return self.weight, self.bias


@dataclass
class ScaleCall:
    """One recorded elementwise affine call: ``y = x̂ ⊙ γ + β`` with broadcast ``γ, β``.

    Attributes:
        weight: ``γ`` (a parameter) or ``None``; ``bias``: ``β`` or ``None``.
        shape: The parameters' shape as broadcast against ``y`` (same number of
            dimensions, size 1 where broadcast, the batch dimension included).
        xhat: The tensor ``γ`` multiplies (``None`` without ``γ``), detached,
            broadcastable to ``y``: the other factor of a product, or a
            normalisation's normalised input.
        output: ``y`` in the graph; ``edge``: its gradient edge as computed.
    """

    weight: Tensor | None
    bias: Tensor | None
    shape: tuple[int, ...]
    xhat: Tensor | None
    output: Tensor
    edge: GradientEdge | None

    @property
    def params(self) -> tuple[Tensor | None, Tensor | None]:
        """``(weight, bias)``."""
        return self.weight, self.bias


#: Calls that give a view of a parameter with its elements in order.
VIEWS = (Tensor.reshape, Tensor.view, Tensor.unsqueeze, torch.reshape, torch.unsqueeze)
#: Indexing: a view of the whole parameter in order only where it is the parameter's
#: memory, read in order (``pos[:T]`` with ``T`` the table's length); checked.
INDEXING = (Tensor.__getitem__,)
#: Products and sums with a broadcast parameter.
PRODUCTS = (torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__)
SUMS = (torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__)
#: Normalisations with an elementwise affine.
NORMS = tuple(
    f for f in (F.layer_norm, F.group_norm, getattr(F, "rms_norm", None)) if f
)
#: The linear functions :class:`FunctionalCalls` records.
LINEAR_FUNCTIONS = (F.linear, torch.addmm)


class FunctionalCalls:
    """Records linear and elementwise affine calls of the parameters ``selected``.

    Attributes:
        linear: The :class:`LinearCall` records; ``scale``: the :class:`ScaleCall`
            records.
        views: ``id(view) -> (parameter, view)`` for views of a parameter with its
            elements in order (``gamma.reshape(1, -1, 1, 1)``).
    """

    def __init__(self, selected: set[int]) -> None:
        self.selected = selected
        self.linear: list[LinearCall] = []
        self.scale: list[ScaleCall] = []
        self.views: dict[int, tuple[Tensor, Tensor]] = {}

    def root(self, t: object) -> Tensor | None:
        """The parameter ``t`` is (or is an in-order view of), else ``None``."""
        if not isinstance(t, Tensor):
            return None
        if id(t) in self.selected:
            return t
        found = self.views.get(id(t))
        return found[0] if found is not None and found[1] is t else None

    def handle(self, func, args: tuple, kwargs: dict, out: object) -> bool:
        """Record ``out = func(*args, **kwargs)``; ``True`` if it is a parameter view."""
        if not isinstance(out, Tensor):
            return False
        if func in VIEWS + INDEXING and args and self.root(args[0]) is not None:
            p = self.root(args[0])
            in_order = func not in INDEXING or _same_memory(out, p)
            if out.numel() == p.numel() and out.requires_grad and in_order:
                self.views[id(out)] = (p, out)
                return True
            return False
        if func in LINEAR_FUNCTIONS:
            self._linear(func, args, kwargs, out)
        elif func in NORMS:
            self._norm(func, args, kwargs, out)
        elif func in PRODUCTS or func in SUMS:
            self._broadcast(func, args, kwargs, out)
        return False

    def _linear(self, func, args: tuple, kwargs: dict, out: Tensor) -> None:
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
        if not isinstance(x, Tensor):
            return
        bias = b if isinstance(b, Tensor) and id(b) in self.selected else None
        if bias is not None and bias.shape != out.shape[-1:]:
            bias = None
        edge = get_gradient_edge(out) if out.requires_grad else None
        self.linear.append(LinearCall(W, bias, io, x.detach(), out, edge))

    def _norm(self, func, args: tuple, kwargs: dict, out: Tensor) -> None:
        if func is F.group_norm:
            names = ("input", "num_groups", "weight", "bias", "eps")
        else:  # layer_norm / rms_norm: (input, normalized_shape, weight, [bias,] eps)
            names = ("input", "normalized_shape", "weight")
            names += ("bias", "eps") if func is F.layer_norm else ("eps",)
        call = dict(zip(names, args), **kwargs)
        x, w, b = call.get("input"), call.get("weight"), call.get("bias")
        w = w if isinstance(w, Tensor) and id(w) in self.selected else None
        b = b if isinstance(b, Tensor) and id(b) in self.selected else None
        if (w is None and b is None) or not isinstance(x, Tensor) or x.dim() < 2:
            return
        rms = func is getattr(F, "rms_norm", None)
        eps = call.get("eps", None if rms else 1e-5)
        with torch.no_grad():
            if func is F.group_norm:
                xhat = func(x, call["num_groups"], None, None, eps)
                shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
            else:
                normalized = tuple(call["normalized_shape"])
                if func is F.layer_norm:
                    xhat = func(x, normalized, None, None, eps)
                else:
                    xhat = func(x, normalized, None, eps)
                shape = (1,) * (x.dim() - len(normalized)) + normalized
        edge = get_gradient_edge(out) if out.requires_grad else None
        self.scale.append(
            ScaleCall(w, b, shape, xhat if w is not None else None, out, edge)
        )

    def _broadcast(self, func, args: tuple, kwargs: dict, out: Tensor) -> None:
        if len(args) != 2 or kwargs.get("alpha", 1) != 1:
            return
        a, c = args
        pa, pc = self.root(a), self.root(c)
        if (pa is None) == (pc is None):  # no parameter, or two
            return
        view, other = (a, c) if pa is not None else (c, a)
        p = pa if pa is not None else pc
        if out.dim() == 0 or view.dim() > out.dim():
            return
        shape = (1,) * (out.dim() - view.dim()) + tuple(view.shape)
        if shape[0] != 1 or any(s not in (1, o) for s, o in zip(shape, out.shape)):
            return
        product = func in PRODUCTS
        if product and not isinstance(other, Tensor):
            other = torch.as_tensor(other, dtype=out.dtype, device=out.device)
        edge = get_gradient_edge(out) if out.requires_grad else None
        if product:
            xhat = other.detach()
            self.scale.append(ScaleCall(p, None, shape, xhat, out, edge))
        else:
            self.scale.append(ScaleCall(None, p, shape, None, out, edge))


def _same_memory(view: Tensor, p: Tensor) -> bool:
    """``view`` reads every element of ``p``'s memory in ``p``'s order."""
    return (
        view.data_ptr() == p.data_ptr()
        and view.is_contiguous()
        and p.is_contiguous()
        and view.numel() == p.numel()
    )


class ForwardCalls(TorchFunctionMode):
    """The capture's function mode: BatchNorm substitution, recorded calls, uses.

    Attributes:
        uses: ``id(p) -> `` how many differentiable calls read the parameter ``p``
            (one of ``tracked``) directly or through an in-order view: more than one
            means tied weights or a layer run several times, whose rows need the
            cross terms of the uses.
        lowest: The least precise floating dtype of any differentiable result (a
            float32 cast inside a float64 model: EvoNorm, T5's RMSNorm); the model
            is exact only to its round-off, which the self-check then allows.
    """

    def __init__(
        self,
        bns: BatchNormCalls | None,
        recorder: FunctionalCalls | None,
        tracked: set[int],
    ) -> None:
        super().__init__()
        self.bns, self.recorder, self.tracked = bns, recorder, tracked
        self.uses: Counter[int] = Counter()
        self.lowest: torch.dtype | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is ATTENTION and self.recorder is not None:
            opened = self._attention(args, kwargs)
            if opened is not None:
                return opened
        if func is F.batch_norm and self.bns is not None:
            out = self.bns.handle(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
            if self.recorder is not None and self.recorder.handle(
                func, args, kwargs, out
            ):
                return out  # a view of a parameter: its uses count
        outs = out if isinstance(out, (list, tuple)) else (out,)
        live = [o for o in outs if isinstance(o, Tensor) and o.requires_grad]
        for o in live:
            if o.is_floating_point() and (
                self.lowest is None
                or torch.finfo(o.dtype).eps > torch.finfo(self.lowest).eps
            ):
                self.lowest = o.dtype
        if live:  # not metadata
            for a in (*args, *kwargs.values()):
                for t in a if isinstance(a, (list, tuple)) else (a,):
                    p = self._root(t)
                    if p is not None:
                        self.uses[id(p)] += 1
        return out

    def _attention(self, args: tuple, kwargs: dict) -> tuple | None:
        """The attention call with its projections recorded, or ``None``.

        :func:`~lowrank_ggn.core.engine.attention.open_attention`; on ``None`` what
        the attempt recorded is dropped.
        """
        rec = self.recorder
        saved = len(rec.linear), len(rec.scale), dict(rec.views), Counter(self.uses)
        opened = open_attention(args, kwargs, rec.selected, self)
        if opened is None:
            del rec.linear[saved[0] :], rec.scale[saved[1] :]
            rec.views, self.uses = saved[2], saved[3]
        return opened

    def _root(self, t: object) -> Tensor | None:
        if not isinstance(t, Tensor):
            return None
        if id(t) in self.tracked:
            return t
        return self.recorder.root(t) if self.recorder is not None else None


__all__ = [
    "LINEAR_FUNCTIONS",
    "NORMS",
    "ForwardCalls",
    "FunctionalCalls",
    "LinearCall",
    "ScaleCall",
]
