r"""The Gram operator ``U ↦ Sᵀ J Jᵀ S U`` from one VJP and one JVP per column.

For coefficient columns ``U`` ``[NC, B]`` (rows sample-major):

.. math::
    𝒢 U = Vᵀ (V U) = Sᵀ J_θF \,\bigl(J_θFᵀ (S U)\bigr).

* ``V U`` ``[B, D]``: one full-batch backward pass per column on the graph of one
  captured forward pass, asking for the gradients of captured layer *outputs* only;
  a ``Linear``/``Conv2d`` weight gradient is then one matrix product with the stored
  (unfolded) layer input, ``Σ_n g_nᵀ A_n`` (on CPUs far faster than autograd's
  convolution weight gradients).
* ``J (V U)`` ``[B, N, *out]``: the model linearised once by ``torch.func.linearize``
  (one traced forward pass, then only tangent arithmetic per column).
* the projection onto ``S`` gives ``[B, NC]``.

Exact for any model (BatchNorm in train mode included: both products differentiate
the true batch function). Memory: ``B·D`` plus one column's activations. On CPUs the
columns of a block run one after another (batched autodiff is slower there); on other
devices they run batched. :func:`streamed_gram` applies the operator to blocks of the
identity; :func:`lowrank_ggn.core.spectrum.lanczos_eigenpairs` to Krylov blocks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import jvp, linearize, vmap

from lowrank_ggn.core.engine.accumulate import weight_rows
from lowrank_ggn.core.engine.backprop import batched_grad
from lowrank_ggn.core.engine.capture import Layer, capture, captured_layers
from lowrank_ggn.core.engine.report import EngineReport
from lowrank_ggn.core.linearization import Linearization

#: Below this many JVPs, tracing ``torch.func.linearize`` costs more than it saves.
LINEARIZE_MIN_JVPS = 24


def project(lin: Linearization, out_tangents: Tensor) -> Tensor:
    """``Sᵀ T`` for output tangents ``T`` ``[B, N, *out]``: ``[B, NS·C]`` sample-major."""
    B = out_tangents.shape[0]
    NS, C = lin.num_samples, lin.num_columns_per_sample
    picked = out_tangents.reshape(B, lin.batch_size, -1)[:, lin.sample_index]
    S = lin.factors.reshape(C, NS, -1)
    return torch.einsum("bno,cno->bnc", picked, S).reshape(B, NS * C)


class GramOperator:
    """``𝒢_g U`` for parameter groups ``g``, from one captured forward pass.

    Args:
        lin: The linearised model.
        report: Pass counts go here.
        expected_jvps: How many JVPs the caller will ask for (decides whether the
            model is linearised by tracing).
    """

    def __init__(
        self,
        lin: Linearization,
        report: EngineReport,
        expected_jvps: int = 0,
        captured: tuple[Tensor, list[Layer]] | None = None,
    ) -> None:
        self.lin, self.report = lin, report
        fm = lin.fmodel
        if captured is None:
            captured = capture_forward(lin, report)
        self.out, self.layers = captured
        captured = {id(p) for la in self.layers for p in la.params}
        self.generic = [p for p in fm.params if id(p) not in captured]
        self._jvp = None
        if expected_jvps >= LINEARIZE_MIN_JVPS:
            try:
                with warnings.catch_warnings():  # torch.fx's constant folding
                    warnings.simplefilter("ignore", UserWarning)
                    _, self._jvp = linearize(
                        lambda *theta: fm(theta, lin.inputs), *fm.primals()
                    )
                report.count("forward")
            except Exception:  # noqa: BLE001 - untraceable model: plain jvp below
                self._jvp = None

    def vjp(self, cotangents: Tensor) -> Tensor:
        """``J_θFᵀ W_b`` for cotangents ``[B, N, *out]``: ``[B, D]`` (``params`` order)."""
        targets = [la.outputs[0] for la in self.layers] + self.generic
        grads = batched_grad(self.out, targets, cotangents)
        self.report.count("backward", cotangents.shape[0])
        parts: dict[int, Tensor] = {}
        B = cotangents.shape[0]
        for la, g in zip(self.layers, grads):
            if g is None:
                g = cotangents.new_zeros(B, *la.outputs[0].shape)
            g = la.output_grad(g)  # [B, N, P, O]
            if la.weight is not None:
                parts[id(la.weight)] = weight_rows(g, la.A)
            if la.bias is not None:
                parts[id(la.bias)] = g.sum(dim=(1, 2))
        for p, g in zip(self.generic, grads[len(self.layers) :]):
            parts[id(p)] = p.new_zeros(B, *p.shape) if g is None else g
        return self.lin.fmodel.flatten(
            [parts[id(p)].reshape(B, -1) for p in self.lin.fmodel.params], batch_dims=1
        )

    def jvp(self, directions: Tensor) -> Tensor:
        """``J_θF · d_b`` for flat parameter directions ``[B, D]``: ``[B, N, *out]``."""
        fm, lin = self.lin.fmodel, self.lin
        self.report.count("jvp", directions.shape[0])
        tangents = fm.unflatten(directions)
        if self._jvp is not None:
            fn = self._jvp
        else:
            theta = fm.primals()

            def fn(*tangent: Tensor) -> Tensor:
                return jvp(lambda th: fm(th, lin.inputs), (theta,), (tangent,))[1]

        if directions.device.type == "cpu":
            return torch.stack(
                [fn(*(t[b] for t in tangents)) for b in range(directions.shape[0])]
            )
        return vmap(fn)(*tangents)

    def apply(self, U: Tensor, masks: list[Tensor] | None = None) -> list[Tensor]:
        """``𝒢_g U`` ``[NC, B]`` for each group mask ``[D]`` (``None``: all of ``θ``)."""
        VU = self.vjp(self.lin.combine(U.T))  # [B, D]
        return [
            project(self.lin, self.jvp(VU if mask is None else VU * mask)).T
            for mask in masks or [None]
        ]


def capture_forward(
    lin: Linearization, report: EngineReport
) -> tuple[Tensor, list[Layer]]:
    """One forward pass with the graph, capturing ``Linear``/``Conv2d`` layers."""
    selected = {id(p) for p in lin.fmodel.params}
    layers = captured_layers(lin.fmodel.model, selected)
    with torch.enable_grad(), capture(layers, []):
        out = lin.forward_with_graph()
    report.count("forward")
    layers = [la for la in layers if len(la.outputs) == 1]
    for la in layers:
        la.A = la.layer_input()
    return out, layers


def block_width(lin: Linearization, budget: int, groups: int = 1) -> int:
    """Columns per VJP/JVP block: ``[B, D]`` directions plus ``B`` activation copies."""
    item = lin.outputs.element_size()
    D = lin.fmodel.num_params
    per_column = item * (3 * D + 8 * lin.inputs.numel() * max(1, groups) + 1)
    return int(max(1, min(lin.num_columns, (budget // 4) // per_column)))


def streamed_gram(
    lin: Linearization,
    budget: int,
    masks: list[Tensor] | None,
    report: EngineReport,
    tick: Callable[[int], None] | None = None,
    captured: tuple[Tensor, list[Layer]] | None = None,
    acc_dtype: torch.dtype | None = None,
) -> list[Tensor]:
    """Every group's Gram matrix, block column by block column (memory ``B·D``).

    ``captured``: the graph output and captured layers of a forward pass already
    run (see :func:`capture_forward`), reused instead of a new one. ``acc_dtype``:
    dtype of the returned Gram (its entries are the operator's products, computed in
    the parameters' dtype; only the symmetrisation and ``eigh`` gain from float64).
    """
    NC = lin.num_columns
    dtype, device = lin.outputs.dtype, lin.outputs.device
    op = GramOperator(lin, report, NC * len(masks or [None]), captured)
    acc = dtype if acc_dtype is None else acc_dtype
    grams = [torch.zeros(NC, NC, dtype=acc, device=device) for _ in masks or [None]]
    width = block_width(lin, budget, len(masks or [None]))
    for start in range(0, NC, width):
        stop = min(NC, start + width)
        E = torch.zeros(NC, stop - start, dtype=dtype, device=device)
        E[torch.arange(start, stop), torch.arange(stop - start)] = 1.0
        for gram, cols in zip(grams, op.apply(E, masks)):
            gram[:, start:stop] = cols
        if tick is not None:
            tick(stop - start)
    return [0.5 * (g + g.T) for g in grams]


__all__ = [
    "GramOperator",
    "block_width",
    "capture_forward",
    "project",
    "streamed_gram",
]
