r"""The Gram operator ``U ↦ Sᵀ J Jᵀ S U`` from one VJP and one JVP per column.

For coefficient columns ``U`` ``[NC, B]`` (rows sample-major):

.. math::
    𝒢 U = Vᵀ (V U) = Sᵀ J_θF \,\bigl(J_θFᵀ (S U)\bigr).

* the VJP: one full-batch backward pass per column on the graph of one captured
  forward pass, asking for the gradients of captured layer *outputs* only (and of
  the parameters of no captured layer);
* the JVP, by default through the layer-output tangents of :mod:`.injected`
  (``δy = (A Aᵀ + 11ᵀ) g`` for a convolution with unfolded inputs ``A``: no
  parameter rows), the model's tangent program traced once and vmapped over the
  block; else ``V U`` ``[B, D]`` from the layers' stored operands (e.g.
  ``Σ_n g_nᵀ A_n``) and ``J (V U)`` by ``torch.func.linearize`` (traced once, kept
  only if it agrees with a plain ``jvp``), or plain ``jvp`` per column, or, for an
  operator without forward-mode AD, double backward through the captured graph
  (:func:`lowrank_ggn.core.autodiff.graph_jvps`);
* the projection onto ``S`` gives ``[B, NC]``.

The layer formulas are checked once against autograd (one backward pass for a random
cotangent); a parameter also used outside its module sends every parameter through
autograd. Exact for any model (BatchNorm in train mode included: both products
differentiate the true batch function). Memory: the block's tangents (``B·D`` on the
parameter-row route). On CPUs the VJPs of a block run one after another, elsewhere
batched. :func:`streamed_gram` applies the operator to blocks of the identity;
:func:`lowrank_ggn.core.spectrum.lanczos_eigenpairs` to Krylov blocks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.func import jvp, linearize, vmap

from lowrank_ggn.core.autodiff import batched_grad, graph_jvps, no_rule, vmappable
from lowrank_ggn.core.engine.backprop import AUTOGRAD_OVERHEAD
from lowrank_ggn.core.engine.capture import capture, captured_layers
from lowrank_ggn.core.engine.injected import InjectedRoute
from lowrank_ggn.core.engine.layer import Layer
from lowrank_ggn.core.engine.report import EngineReport
from lowrank_ggn.core.model import composite_attention
from lowrank_ggn.core.tolerances import roundoff_rtol

if TYPE_CHECKING:
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
        captured: The graph output and captured layers of a forward pass already
            run (:func:`capture_forward`; ``None``: run one).
        budget: Bytes its work may hold (``None``: unbounded); the route of
            :mod:`.injected` (one more recorded pass) only if that fits in ``budget/4``.
    """

    def __init__(
        self,
        lin: Linearization,
        report: EngineReport,
        expected_jvps: int = 0,
        captured: tuple[Tensor, list[Layer]] | None = None,
        budget: int | None = None,
    ) -> None:
        self.lin, self.report = lin, report
        fm = lin.fmodel
        if captured is None:
            captured = capture_forward(lin, report)
        self.out, layers = captured
        self.layers_seen = [la for la in layers if la.outputs]
        # layers captured on trust are left to autograd; the others are checked once
        self.layers = [la for la in layers if not la.on_trust and not la.shared]
        captured = {id(p) for la in self.layers for p in la.params}
        self.generic = [p for p in fm.params if id(p) not in captured]
        self._verify_layers()
        self._jvp = None
        self._forward_mode = True
        self._batched_jvp = True
        self.route: InjectedRoute | None = None
        self._injected = None
        acts = sum(la.outputs[0].numel() for la in self.layers_seen)
        traced = AUTOGRAD_OVERHEAD * acts * self.out.element_size()
        if expected_jvps >= LINEARIZE_MIN_JVPS:
            if budget is None or traced <= budget // 4:
                self._trace_injected()
            if self._injected is None:
                self._linearize()

    def _verify_layers(self) -> None:
        """The layer formulas against autograd for one random cotangent.

        A parameter that is also used outside its module (a tied weight) breaks the
        formulas; then every parameter goes through autograd. One backward pass, not
        counted in the report (like the other strategies' self-check).
        """
        if not self.layers:
            return
        fm = self.lin.fmodel
        gen = torch.Generator(device="cpu").manual_seed(1234)
        w = torch.randn(1, *self.out.shape, generator=gen, dtype=self.out.dtype)
        w = w.to(self.out.device)
        params = list(fm.params)
        grads = batched_grad(self.out, [la.target for la in self.layers] + params, w)
        L = len(self.layers)
        generic = {id(p): g for p, g in zip(params, grads[L:])}
        mine = self._assemble(grads[:L], [generic[id(p)] for p in self.generic], 1)
        direct = fm.flatten(
            [
                p.new_zeros(1, *p.shape) if g is None else g
                for p, g in zip(params, grads[L:])
            ],
            batch_dims=1,
        )
        scale = max(direct.norm().item(), mine.norm().item(), 1e-30)
        if (direct - mine).norm() > roundoff_rtol(direct.dtype) * scale:
            self.layers, self.generic = [], params
            self.report.fallback = (
                "a captured layer's parameter is used outside it: autograd for all"
            )

    def _linearize(self) -> None:
        """Trace ``torch.func.linearize`` once; keep it if it agrees with ``jvp``.

        Not for recurrent layers: their traced products differ from call to call.
        """
        fm, lin = self.lin.fmodel, self.lin
        if any(isinstance(m, torch.nn.RNNBase) for m in fm.model.modules()):
            return
        try:
            with warnings.catch_warnings(), composite_attention():
                warnings.simplefilter("ignore", UserWarning)  # torch.fx's folding
                _, traced = linearize(
                    lambda *theta: fm(theta, lin.inputs), *fm.primals()
                )
            self.report.count("forward")
            gen = torch.Generator(device="cpu").manual_seed(4321)
            t = [
                torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
                for p in fm.params
            ]
            with composite_attention():
                fast, again = traced(*t), traced(*t)
            plain = self._plain_jvp(t)
        except Exception:  # noqa: BLE001 - untraceable model: plain jvp
            return
        tol = roundoff_rtol(plain.dtype) * max(plain.norm().item(), 1e-30)
        if (fast - plain).norm() <= tol and (again - plain).norm() <= tol:
            self._jvp = traced

    def _trace_injected(self) -> None:
        """Trace the layer-output-tangent route of :mod:`.injected`, checked.

        Kept if it agrees with the parameter-row route (one VJP and one plain JVP)
        for a random cotangent.
        """
        fm, lin = self.lin.fmodel, self.lin
        if not self.layers or not vmappable(fm.model):
            return
        route = InjectedRoute(fm, lin.inputs, self.layers, self.generic)
        if not route.kernels:
            return
        try:
            with warnings.catch_warnings(), composite_attention():
                warnings.simplefilter("ignore", UserWarning)  # torch.fx's folding
                _, traced = linearize(route.forward, *route.primals)
            self.report.count("forward")
            gen = torch.Generator(device="cpu").manual_seed(4321)
            w = torch.randn(1, *self.out.shape, generator=gen, dtype=self.out.dtype)
            w = w.to(self.out.device)
            targets = [la.target for la in self.layers] + self.generic
            grads = batched_grad(self.out, targets, w)
            with composite_attention():
                fast = traced(*(t[0] for t in route.tangents(grads, 1)))
            L = len(self.layers)
            rows = self._assemble(grads[:L], grads[L:], 1)
            plain = self._plain_jvp([t[0] for t in fm.unflatten(rows)])
        except Exception:  # noqa: BLE001 - untraceable model: the parameter rows
            return
        tol = roundoff_rtol(plain.dtype) * max(plain.norm().item(), 1e-30)
        if (fast - plain).norm() <= tol:
            self.route, self._injected = route, traced

    def _injected_products(self, cotangents: Tensor) -> Tensor:
        """``J_θF J_θFᵀ W_b`` ``[B, N, *out]`` by the layer-output tangents."""
        B = cotangents.shape[0]
        targets = [la.target for la in self.layers] + self.generic
        grads = batched_grad(self.out, targets, cotangents)
        self.report.count("backward", B)
        self.report.count("jvp", B)
        tangents = self.route.tangents(grads, B)
        with composite_attention():
            if self._batched_jvp:
                try:  # the traced tangent program, vmapped over the block
                    return vmap(self._injected)(*tangents)
                except (RuntimeError, NotImplementedError):  # no batch rule
                    self._batched_jvp = False
            return torch.stack([self._injected(*col) for col in zip(*tangents)])

    def _plain_jvp(self, tangent: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
        fm, lin = self.lin.fmodel, self.lin
        return jvp(lambda th: fm(th, lin.inputs), (fm.primals(),), (tuple(tangent),))[1]

    def _assemble(self, layer_grads: list, generic_grads: list, B: int) -> Tensor:
        """``[B, D]`` from output gradients of the layers and generic gradients."""
        parts: dict[int, Tensor] = {}
        for la, g in zip(self.layers, layer_grads):
            if g is None:
                g = self.out.new_zeros(B, *la.outputs[0].shape)
            g = la.output_grad(g)  # [B, N, P, O]
            for p, rows in zip(la.params, la.param_rows(g)):
                parts[id(p)] = rows
        for p, g in zip(self.generic, generic_grads):
            parts[id(p)] = p.new_zeros(B, *p.shape) if g is None else g
        return self.lin.fmodel.flatten(
            [parts[id(p)].reshape(B, -1) for p in self.lin.fmodel.params], batch_dims=1
        )

    def vjp(self, cotangents: Tensor) -> Tensor:
        """``J_θFᵀ W_b`` for cotangents ``[B, N, *out]``: ``[B, D]`` (``params`` order)."""
        targets = [la.target for la in self.layers] + self.generic
        grads = batched_grad(self.out, targets, cotangents)
        self.report.count("backward", cotangents.shape[0])
        L = len(self.layers)
        return self._assemble(grads[:L], grads[L:], cotangents.shape[0])

    def jvp(self, directions: Tensor) -> Tensor:
        """``J_θF · d_b`` for flat parameter directions ``[B, D]``: ``[B, N, *out]``.

        Forward mode (attention by its math kernel, which has forward-mode AD): the
        traced tangent program of :meth:`_linearize` vmapped over the block (on a
        2-core CPU 3.5–5× faster than one direction after another for a ResNet-18,
        bit-identical), else plain ``jvp`` per direction on CPUs and vmapped
        elsewhere; for an operator without forward-mode AD, double backward through
        the captured graph from the captured layers' outputs (:meth:`_graph_jvps`).
        """
        fm = self.lin.fmodel
        self.report.count("jvp", directions.shape[0])
        tangents = fm.unflatten(directions)
        if self._jvp is not None and self._batched_jvp:
            try:  # the traced tangent program, vmapped: one pass of batched ops
                with composite_attention():
                    return vmap(self._jvp)(*tangents)
            except (RuntimeError, NotImplementedError):  # an op without a batch rule
                self._batched_jvp = False
        if self._forward_mode:
            fn = self._jvp or (lambda *t: self._plain_jvp(t))
            try:
                with composite_attention():
                    if directions.device.type == "cpu":  # one column after another
                        return torch.stack([fn(*col) for col in zip(*tangents)])
                    return vmap(fn)(*tangents)
            except (RuntimeError, NotImplementedError) as err:
                if not no_rule(err):
                    raise
                self._forward_mode = False
        return self._graph_jvps(tangents)

    def _graph_jvps(self, tangents: tuple[Tensor, ...]) -> Tensor:
        r"""``J t`` by double backward from the layer outputs ``y_l`` down.

        ``J t = Σ_l (∂F/∂y_l) δy_l + Σ_p J_p t_p`` with the layer-output tangents
        ``δy_l = (∂y_l/∂θ_l) t_l``, the adjoint of the layer's row formula
        (:meth:`_output_tangents`): the captured layers' own operations (an
        ``EmbeddingBag``, which has neither forward-mode AD nor double backward)
        are never differentiated twice.
        """
        by_id = {id(p): t for p, t in zip(self.lin.fmodel.params, tangents)}
        nodes = [la.target for la in self.layers] + self.generic
        tans = [
            self._output_tangents(la, [by_id[id(p)] for p in la.params])
            for la in self.layers
        ] + [by_id[id(p)] for p in self.generic]
        return graph_jvps(self.out, nodes, tuple(tans))

    def _output_tangents(self, la: Layer, tangents: list[Tensor]) -> Tensor:
        """``δy = (∂y/∂θ_l) t`` ``[K, *y]``: the adjoint of :meth:`Layer.param_rows`."""
        y = la.outputs[0]
        z = y.new_zeros(1, *y.shape, requires_grad=True)
        with torch.enable_grad():
            rows = la.param_rows(la.output_grad(z))  # linear in z: [1, numel] each
        K = tangents[0].shape[0]
        (dy,) = batched_grad(rows, [z], [t.reshape(K, 1, -1) for t in tangents])
        return y.new_zeros(K, *y.shape) if dy is None else dy[:, 0]

    def apply(self, U: Tensor, masks: list[Tensor] | None = None) -> list[Tensor]:
        """``𝒢_g U`` ``[NC, B]`` for each group mask ``[D]`` (``None``: all of ``θ``)."""
        W = self.lin.combine(U.T)  # [B, N, *out]
        if self._injected is not None and masks is None:
            return [project(self.lin, self._injected_products(W)).T]
        if self._injected is not None and self._jvp is None:
            self._linearize()  # group masks act on the parameter rows
        VU = self.vjp(W)  # [B, D]
        return [
            project(self.lin, self.jvp(VU if mask is None else VU * mask)).T
            for mask in masks or [None]
        ]


def capture_forward(
    lin: Linearization, report: EngineReport
) -> tuple[Tensor, list[Layer]]:
    """One forward pass with the graph, capturing the layers the engine knows."""
    selected = {id(p) for p in lin.fmodel.params}
    layers = captured_layers(lin.fmodel.model, selected)
    with torch.enable_grad(), capture(layers, []):
        out = lin.forward_with_graph()
    report.count("forward")
    layers = [la for la in layers if la.prepare(lin.batch_size)]
    return out, layers


def block_width(
    lin: Linearization,
    budget: int,
    groups: int = 1,
    activations: int = 0,
    directions: int | None = None,
) -> int:
    """Columns per VJP/JVP block: ``[B, D]`` directions plus ``B`` activation copies.

    ``activations``: entries of the captured layers' outputs (0: unknown, then the
    inputs' size stands in); a batched product holds ``AUTOGRAD_OVERHEAD`` times
    them per column. ``directions``: parameter entries per column (default ``D``;
    the injected route holds only those of uncaptured parameters).
    """
    item = lin.outputs.element_size()
    D = lin.fmodel.num_params if directions is None else directions
    acts = max(activations + lin.outputs.numel(), 8 * lin.inputs.numel())
    per_column = item * (3 * D + AUTOGRAD_OVERHEAD * acts * max(1, groups) + 1)
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
    run (see :func:`capture_forward`), reused (its BatchNorm layers backpropagate
    through one fused autograd function, as fast as the native kernel).
    ``acc_dtype``: dtype of the returned Gram (its entries are computed in the
    parameters' dtype).
    """
    NC = lin.num_columns
    dtype, device = lin.outputs.dtype, lin.outputs.device
    jvps = NC * len(masks or [None])
    op = GramOperator(lin, report, jvps, captured, budget)
    acc = dtype if acc_dtype is None else acc_dtype
    grams = [torch.zeros(NC, NC, dtype=acc, device=device) for _ in masks or [None]]
    acts = sum(la.outputs[0].numel() for la in op.layers_seen)
    direct = (
        None if op.route is None or masks else sum(p.numel() for p in op.route.rest)
    )
    width = block_width(lin, budget, len(masks or [None]), acts, direct)
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
