r"""The Gram operator's JVP driven by layer-output tangents: no parameter rows.

A captured layer ``y = W A + b`` (convolution or linear, weight ``[O, I]``, operand
``A`` ``[N·P, I]`` of unfolded inputs) turns an output gradient ``g`` ``[N·P, O]``
of a VJP into the weight rows ``Vᵀ u = Aᵀ g`` ``[I, O]``, and the JVP of those rows
reads them only through the layer's output tangent

.. math::
    δy = A (Aᵀ g) + 1 1ᵀ g = (A Aᵀ + 1 1ᵀ)\, g,

so one Gram column needs neither the ``D`` parameter rows nor the tangent
convolutions ``conv(x, δW)``: :class:`OutputKernel` forms ``δy`` from ``g`` (by the
kernel ``K = A Aᵀ`` ``[N·P, N·P]`` where ``N·P ≤ 2 I``, the deep layers of a ResNet,
else by two GEMMs through ``δW``), and :func:`injected_forward` is the model as a
function of additive perturbations ``ε_l`` of those layers' outputs and of the other
parameters, whose JVP at ``ε = 0`` propagates the ``δy_l`` (and the other
parameters' tangents) to the outputs:

.. math::
    J_θF\, (J_θFᵀ w) = Σ_l \frac{∂F}{∂y_l} δy_l + Σ_{p ∉ l} J_p\, (J_pᵀ w).

Exact for any model in which these layers run once (BatchNorm in train mode
included); :class:`~lowrank_ggn.core.engine.streamed.GramOperator` checks the route
once against the parameter-row route before it uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from lowrank_ggn.core.engine.layer import Layer
from lowrank_ggn.core.engine.layers import Kind, channels_first
from lowrank_ggn.core.engine.operands import DenseOperand
from lowrank_ggn.core.inputs import ModelInputs
from lowrank_ggn.core.model import FunctionalModel


def injectable(la: Layer) -> bool:
    """Whether ``la``'s output tangent has the closed form above (dense, by module)."""
    op = la.operand
    return (
        not la.functional
        and la.kind in (Kind.LINEAR, Kind.CONV)
        and isinstance(op, DenseOperand)
        and not op.transposed
        and op.patches is None
        and len(la.outputs) == 1
        and isinstance(la.outputs[0], Tensor)
    )


class OutputKernel:
    r"""``δy = (∂y/∂θ_l)(∂y/∂θ_l)ᵀ g`` for a block of output gradients of one layer.

    Per group ``j`` of a grouped convolution its own operand ``A_j`` ``[N·P, I_g]``:
    the kernel ``K_j = A_j A_jᵀ`` once if ``N·P ≤ 2 I_g`` (then one GEMM
    ``[B·O_g, N·P] @ [N·P, N·P]`` per block), else ``(g A_j) A_jᵀ``.

    Args:
        la: An :func:`injectable` layer with its operand built.
    """

    def __init__(self, la: Layer) -> None:
        self.layer = la
        op = la.operand
        N, G, P, Ig = op.A.shape
        self.shape = tuple(la.outputs[0].shape)
        self.channels, self.NP = op.channels, N * P
        self.A = [op.A[:, j].reshape(N * P, Ig) for j in range(G)]
        self.K: list[Tensor | None] = [
            A @ A.T if N * P <= 2 * Ig else None for A in self.A
        ]
        self.weight, self.bias = la.weight is not None, la.bias is not None

    def __call__(self, g: Tensor) -> Tensor:
        """Output gradients ``[B, N, *y]`` -> output tangents ``[B, N, *y]``."""
        B, Og = g.shape[0], self.channels
        gt = self.layer.output_grad(g)  # [B, N, P, O]
        parts = []
        for j, (A, K) in enumerate(zip(self.A, self.K)):
            # [B, N, P, O_g] -> [B·O_g, N·P]
            gj = gt[..., j * Og : (j + 1) * Og].permute(0, 3, 1, 2)
            gj = gj.reshape(B * Og, self.NP)
            if self.weight:
                dy = gj @ K if K is not None else (gj @ A) @ A.T
            else:
                dy = torch.zeros_like(gj)
            if self.bias:
                dy += gj.sum(dim=1, keepdim=True)
            parts.append(dy.reshape(B, Og, -1))
        dy = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # [B, O, N·P]
        dy = dy.reshape(B, -1, self.shape[0], self.NP // self.shape[0])
        if channels_first(self.layer.module):  # [B, O, N, P] -> [B, N, O, P]
            return dy.transpose(1, 2).reshape(B, *self.shape)
        return dy.permute(0, 2, 3, 1).reshape(B, *self.shape)  # [B, N, P, O]


def injected_forward(
    fm: FunctionalModel,
    inputs: ModelInputs,
    rest: Sequence[Tensor],
    modules: Sequence[nn.Module],
) -> Callable[..., Tensor]:
    """``F(θ_rest, ε)``: the model with ``ε_l`` added to the output of ``modules[l]``.

    The parameters outside ``rest`` are held at their values (constants of a traced
    program). Call it with the ``rest`` parameters, then one ``ε`` per module (shaped
    like its output); at ``ε = 0`` it is ``F(θ, X)``. The hooks live only during a
    call.
    """
    primals = list(fm.primals())
    index = {id(p): i for i, p in enumerate(fm.params)}
    slots = [index[id(p)] for p in rest]

    def forward(*args: Tensor) -> Tensor:
        theta = list(primals)
        for i, t in zip(slots, args[: len(slots)]):
            theta[i] = t
        eps = args[len(slots) :]
        handles = [
            m.register_forward_hook(lambda _m, _a, out, e=e: out + e)
            for m, e in zip(modules, eps)
        ]
        try:
            return fm(theta, inputs)
        finally:
            for h in handles:
                h.remove()

    return forward


class InjectedRoute:
    """The tangent inputs of :func:`injected_forward` from a VJP's gradients.

    Args:
        fm: The model.
        inputs: Its batch.
        layers: The captured layers (checked), in the order of the VJP's targets.
        generic: The parameters outside them, whose gradients autograd gives.
    """

    def __init__(
        self,
        fm: FunctionalModel,
        inputs: ModelInputs,
        layers: Sequence[Layer],
        generic: Sequence[Tensor],
    ) -> None:
        self.layers, self.generic = list(layers), list(generic)
        self.kernels = {id(la): OutputKernel(la) for la in layers if injectable(la)}
        covered = {
            id(p) for la in layers if id(la) in self.kernels for p in la.params
        }
        #: Parameters that keep their own tangents (``params`` order).
        self.rest = [p for p in fm.params if id(p) not in covered]
        fast = [la for la in layers if id(la) in self.kernels]
        self.forward = injected_forward(
            fm, inputs, self.rest, [la.module for la in fast]
        )
        #: Where :attr:`forward` is linearised: the parameters, then ``ε = 0``.
        self.primals = [p.detach() for p in self.rest] + [
            torch.zeros_like(la.outputs[0].detach()) for la in fast
        ]

    def tangents(self, grads: Sequence[Tensor | None], B: int) -> list[Tensor]:
        """Tangents ``[B, *primal]`` for gradients of the layer outputs, then generic."""
        L = len(self.layers)
        own: dict[int, Tensor] = {}
        eps = []
        for la, g in zip(self.layers, grads[:L]):
            if g is None:
                g = la.outputs[0].new_zeros(B, *la.outputs[0].shape)
            kernel = self.kernels.get(id(la))
            if kernel is not None:
                eps.append(kernel(g))
                continue
            for p, rows in zip(la.params, la.param_rows(la.output_grad(g))):
                own[id(p)] = rows
        for p, g in zip(self.generic, grads[L:]):
            own[id(p)] = p.new_zeros(B, *p.shape) if g is None else g
        return [own[id(p)].reshape(B, *p.shape) for p in self.rest] + eps


__all__ = ["InjectedRoute", "OutputKernel", "injectable", "injected_forward"]
