r"""Layer-wise Gram accumulation: ``Vᵀ V = Σ_l V_lᵀ V_l`` without the ``D × NC`` matrix.

The Gram matrix is a sum over parameter blocks, ``𝒢 = Σ_l V_l^⊤ V_l`` with ``V_l`` the
rows of ``V`` that belong to layer ``l``. This module never holds ``V``; it captures
each layer's input ``A_l`` in the forward pass and the gradients ``G_l`` of its output
for every factor column in batched backward passes, then adds each layer's
contribution in the cheapest exact form.

**Columns.** Column ``i`` belongs to sample ``n(i) = sample_index[i // C]``.

* ``per_sample`` path: ``C`` backward passes of the cotangents ``S[c]`` (all samples at
  once) give every column's output gradient ``g_i = G_l[c, n(i)]``.
* ``full_batch`` path: chunks of columns ``e_n ⊗ s_nc`` are backpropagated through the
  whole batch (``is_grads_batched``). A layer whose output gradient for column ``i``
  vanishes *exactly* off sample ``n(i)`` (every layer downstream of the last BatchNorm)
  is **local** and keeps only ``g_i = G_l[i, n(i)]``; any other layer is **mixing**.

**Contributions** (``A_n`` ``[P, I]`` the layer input of sample ``n`` with ``P`` weight-
sharing positions, unfolded for convolutions; ``g_i`` ``[P, O]``):

* local, ``P = 1`` (plain Linear): ``(A Aᵀ)_{n(i)n(j)} · (g_i · g_j)``, i.e.
  ``(A Aᵀ ⊗ 1) ⊙ (G Gᵀ)``; cost ``N²·I + (NC)²·O``.
* local, ``P > 1`` (conv, sequences): per layer the cheaper of
  *explicit* ``V_i = g_iᵀ A_{n(i)}`` ``[O·I]``, summed by symmetric rank-k updates in
  output-channel chunks (cost ``NC·P·O·I + (NC)²·O·I``), and the
  *Kronecker sample-block* form ``𝒢_{(n,·),(m,·)} = Σ_{pq} (A_n A_mᵀ)_{pq} g_{n·,p}·g_{m·,q}``
  (cost ``N²·P²·I + N²·C·P·O·(P + C)``, memory ``N·C·P·O``).
* bias: ``(Σ_p g_i)·(Σ_p g_j)``.
* mixing layers and all other parameters (normalisation affine parameters, custom
  modules): explicit blocks ``[NC, D_l]`` from the backward pass, held in memory
  (bounded by ``memory_budget``) and added by symmetric rank-k updates.

**Safety.** Layers are captured only if they run exactly once in the forward pass and
share no parameter with another module. After accumulation a random combination
``V w`` is recomputed by a direct vector-Jacobian product; if the layer-wise result
disagrees (a parameter used outside its module, say), :func:`layerwise_gram` returns
``None`` and the caller falls back to the generic engine.

**Precision.** Accumulation happens in the parameters' dtype. In float32 the Gram's
entries carry a relative round-off of about ``√K · 6e-8`` for inner products of length
``K``; eigenvalues below ``N·C · eps · λ_max`` are unresolvable (see
:mod:`lowrank_ggn.spectrum`). Use float64 where small eigenvalues matter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.nn.functional import unfold

from lowrank_ggn._memory import release_free_memory
from lowrank_ggn._model import FunctionalModel
from lowrank_ggn._validation import DEFAULT_MEMORY_BUDGET
from lowrank_ggn.factors import Linearization
from lowrank_ggn.sample_mixing import PER_SAMPLE

#: Rough ratio of all intermediate activations to the captured layer outputs, used to
#: size the column chunks of batched full-batch backward passes.
_AUTOGRAD_OVERHEAD = 6


def symmetric_rank_k_update(gram: Tensor, block: Tensor) -> None:
    """``gram += block @ blockᵀ`` for ``block`` ``[NC, K]``, using BLAS ``syrk`` on CPU.

    ``syrk`` computes one triangle only, half the flops of a general product; the
    result is symmetrised. On other devices this is a plain ``addmm``.
    """
    if block.shape[1] == 0:
        return
    if block.device.type == "cpu" and block.dtype in (torch.float32, torch.float64):
        from scipy.linalg import blas

        syrk = blas.ssyrk if block.dtype == torch.float32 else blas.dsyrk
        # a C-contiguous [NC, K] array is the Fortran-ordered [K, NC] matrix Bᵀ;
        # trans=1 gives (Bᵀ)ᵀ Bᵀ = B Bᵀ without a copy
        upper = torch.from_numpy(
            syrk(1.0, np.asarray(block.contiguous().numpy()).T, trans=1)
        )
        upper = upper.triu()
        gram += upper + upper.triu(1).T
    else:
        gram.addmm_(block, block.T)


@dataclass
class _Layer:
    """A captured Linear/Conv2d layer and what the backward passes found for it."""

    name: str
    module: nn.Module
    weight: Tensor | None  # selected parameters only
    bias: Tensor | None
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    local: bool = True
    grads: list[Tensor] = field(default_factory=list)  # local: [B, P, O] per chunk
    explicit: list[Tensor] = field(default_factory=list)  # mixing: [B, D_l] per chunk
    A: Tensor | None = None  # [N, P, I]

    @property
    def params(self) -> list[Tensor]:
        return [p for p in (self.weight, self.bias) if p is not None]

    def grad_matrix(self) -> Tensor:
        """Output gradients of all columns, ``[NC, P, O]`` (one tensor, no copy)."""
        if len(self.grads) > 1:
            self.grads = [torch.cat(self.grads)]
        return self.grads[0]

    def layer_input(self) -> Tensor:
        """``A`` ``[N, P, I]``: unfolded for convolutions, positions for Linear."""
        x = self.inputs[0]
        m = self.module
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

    def explicit_block(self, g: Tensor, A: Tensor) -> Tensor:
        """``V_i`` for columns with output gradients ``g`` ``[B, N, P, O]``: ``[B, D_l]``."""
        blocks = []
        if self.weight is not None:
            w = torch.einsum("bnpo,npi->boi", g, A)
            blocks.append(w.reshape(g.shape[0], -1))
        if self.bias is not None:
            blocks.append(g.sum(dim=(1, 2)))
        return torch.cat(blocks, dim=1)


def _capturable(model: nn.Module, selected: set[int]) -> dict[str, nn.Module]:
    """Linear/Conv2d modules with selected parameters that no other module shares."""
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
        params = [p for p in m.parameters(recurse=False)]
        if not ok or not any(id(p) in selected for p in params):
            continue
        if any(owners[id(p)] > 1 for p in params):
            continue
        found[name] = m
    return found


class _Engine:
    """One layer-wise Gram computation for a :class:`Linearization`."""

    def __init__(
        self,
        lin: Linearization,
        chunk: int,
        memory_budget: int,
        groups: list[list[Tensor]],
    ) -> None:
        self.lin = lin
        self.group_of = {id(p): g for g, members in enumerate(groups) for p in members}
        self.num_groups = len(groups)
        self.chunk = max(1, chunk)
        self.budget = memory_budget
        fm = lin.fmodel
        self.selected = {id(p) for p in fm.params}
        mods = _capturable(fm.model, self.selected)
        self.layers = [
            _Layer(
                name,
                m,
                m.weight if id(m.weight) in self.selected else None,
                m.bias if m.bias is not None and id(m.bias) in self.selected else None,
            )
            for name, m in mods.items()
        ]
        NS, C = lin.num_samples, lin.num_columns_per_sample
        self.NC = NS * C
        # sample of each column (batch position)
        self.col_sample = lin.sample_index.repeat_interleave(C)

    # ----------------------------------------------------------------- forward
    def _forward(self) -> Tensor:
        """Forward pass on the real parameters, capturing layer inputs and outputs."""
        hooks = []
        for layer in self.layers:

            def hook(mod, inp, out, layer=layer):
                layer.inputs.append(inp[0].detach())
                layer.outputs.append(out)

            hooks.append(layer.module.register_forward_hook(hook))
        try:
            out = self.lin.forward_with_graph()
        finally:
            for h in hooks:
                h.remove()
        # a module called twice shares its weights across calls: leave it generic
        self.layers = [la for la in self.layers if len(la.outputs) == 1]
        captured = {id(p) for la in self.layers for p in la.params}
        self.generic = [p for p in self.lin.fmodel.params if id(p) not in captured]
        for la in self.layers:
            la.A = la.layer_input()
        if self.lin.path.name != PER_SAMPLE:
            # a batched backward pass holds, per column, gradients of every activation
            # of the whole batch; bound that transient by a quarter of the budget
            acts = sum(la.outputs[0].numel() for la in self.layers) + out.numel()
            per_column = _AUTOGRAD_OVERHEAD * acts * out.element_size()
            self.chunk = max(
                1, min(self.chunk, (self.budget // 4) // max(1, per_column))
            )
        return out

    # ---------------------------------------------------------------- backward
    def _full_cotangents(self, start: int, stop: int) -> Tensor:
        lin = self.lin
        w = torch.zeros(
            stop - start, self.NC, dtype=lin.outputs.dtype, device=lin.outputs.device
        )
        w[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        return lin.combine(w)  # [B, N, *out]

    def _backward_full_batch(self, out: Tensor) -> list[Tensor]:
        """Chunks of columns through the whole batch; returns generic blocks ``[NC, ·]``."""
        targets = [la.outputs[0] for la in self.layers] + self.generic
        generic_blocks: list[list[Tensor]] = [[] for _ in self.generic]
        for start in range(0, self.NC, self.chunk):
            stop = min(self.NC, start + self.chunk)
            cot = self._full_cotangents(start, stop)
            grads = torch.autograd.grad(
                out,
                targets,
                cot,
                retain_graph=True,
                is_grads_batched=True,
                allow_unused=True,
            )
            rows = torch.arange(stop - start, device=out.device)
            own = self.col_sample[start:stop]
            for la, g in zip(self.layers, grads[: len(self.layers)]):
                if g is None:  # output never reaches the model output
                    g = torch.zeros(
                        stop - start,
                        *la.outputs[0].shape,
                        dtype=out.dtype,
                        device=out.device,
                    )
                g = la.output_grad(g)  # [B, N, P, O]
                if la.local:
                    off = g.clone()
                    off[rows, own] = 0
                    if torch.count_nonzero(off) == 0:
                        la.grads.append(g[rows, own].clone())  # [B, P, O]
                        continue
                    self._make_mixing(la)
                la.explicit.append(la.explicit_block(g, la.A).clone())
            for blocks, g, p in zip(
                generic_blocks, grads[len(self.layers) :], self.generic
            ):
                g = (
                    torch.zeros(stop - start, *p.shape, dtype=p.dtype, device=p.device)
                    if g is None
                    else g
                )
                blocks.append(g.reshape(stop - start, -1).clone())
            self._check_budget()
            if self.lin.outputs.device.type == "cpu" and (start // self.chunk) % 4 == 3:
                release_free_memory()  # see lowrank_ggn._memory
        return [torch.cat(b) for b in generic_blocks]

    def _make_mixing(self, la: _Layer) -> None:
        """A layer found mixing after some local chunks: redo those explicitly."""
        la.local = False
        if la.grads:
            raise _Restart(la.name)

    def _backward_per_sample(self, out: Tensor) -> list[Tensor]:
        """``C`` backward passes of ``S[c]`` at all samples; generic blocks via vmap."""
        lin = self.lin
        C = lin.num_columns_per_sample
        full = torch.zeros(
            C, *lin.outputs.shape, dtype=lin.outputs.dtype, device=lin.outputs.device
        )
        full[:, lin.sample_index] = lin.factors
        per_layer: list[list[Tensor]] = [[] for _ in self.layers]
        for c in range(C):
            grads = (
                torch.autograd.grad(
                    out,
                    [la.outputs[0] for la in self.layers],
                    full[c],
                    retain_graph=True,
                    allow_unused=True,
                )
                if self.layers
                else []
            )
            for store, la, g in zip(per_layer, self.layers, grads):
                g = torch.zeros_like(la.outputs[0]) if g is None else g  # dead branch
                store.append(
                    la.output_grad(g.unsqueeze(0))[0][lin.sample_index]
                )  # [NS, P, O]
        for store, la in zip(per_layer, self.layers):
            la.grads = [
                torch.stack(store, dim=1).flatten(0, 1)
            ]  # [NS·C, P, O], sample-major
        return self._per_sample_generic_blocks()

    def _per_sample_generic_blocks(self) -> list[Tensor]:
        """Per-sample VJPs w.r.t. the non-captured parameters (``torch.func``)."""
        if not self.generic:
            return []
        lin = self.lin
        fm = FunctionalModel(lin.fmodel.model, self.generic)
        theta = fm.primals()
        C = lin.num_columns_per_sample

        def columns(x: Tensor, s: Tensor) -> tuple[Tensor, ...]:
            _, fn = vjp(lambda th: fm.single(th, x), theta)
            return vmap(fn)(s)[0]

        S = lin.factors.movedim(0, 1)  # [NS, C, *out]
        X = lin.inputs[lin.sample_index]
        per = max(1, self.chunk // C)
        blocks: list[list[Tensor]] = [[] for _ in self.generic]
        for start in range(0, X.shape[0], per):
            res = vmap(columns)(X[start : start + per], S[start : start + per])
            for b, r in zip(blocks, res):
                b.append(r.flatten(0, 1).flatten(1))
        return [torch.cat(b) for b in blocks]

    def _check_budget(self) -> None:
        held = sum(
            t.numel() * t.element_size()
            for la in self.layers
            for t in la.explicit + la.grads
        )
        if held > self.budget:
            raise MemoryError(
                f"the layer-wise Gram engine needs more than memory_budget={self.budget / 2**30:.2f} GiB "
                f"for the factor blocks of N·C={self.NC} columns; raise memory_budget, or reduce "
                "the batch, use mc_samples/subsampling, or restrict params."
            )

    # ------------------------------------------------------------- accumulation
    def _add_local(self, grams: list[Tensor], la: _Layer) -> None:
        g = la.grad_matrix()  # [NC, P, O]
        A = la.A  # [N, P, I]
        NC, P, O = g.shape
        I = A.shape[-1]
        if la.bias is not None:
            gb = g.sum(1)
            grams[self.group_of[id(la.bias)]].addmm_(gb, gb.T)
        if la.weight is None:
            return
        gram = grams[self.group_of[id(la.weight)]]
        C = self.lin.num_columns_per_sample
        NS = NC // C
        A_s = A[self.lin.sample_index]  # [NS, P, I]
        if P == 1:
            Ka = A_s[:, 0] @ A_s[:, 0].T  # [NS, NS]
            Ka = Ka.repeat_interleave(C, 0).repeat_interleave(C, 1)
            gram.add_(Ka * (g[:, 0] @ g[:, 0].T))
            return
        explicit_cost = NC * P * O * I + NC * NC * O * I / 2
        kron_cost = NS * NS * P * P * I + NS * NS * C * P * O * (P + C)
        kron_memory = (NS * P * P + NS * C * P * O) * g.element_size()
        if kron_cost < explicit_cost and kron_memory <= self.budget:
            self._add_kron_blocks(gram, g.reshape(NS, C, P, O), A_s)
        else:
            self._add_explicit_local(gram, g.reshape(NS, C, P, O), A_s)

    def _add_kron_blocks(self, gram: Tensor, g: Tensor, A: Tensor) -> None:
        """``𝒢[(n,c),(m,d)] = Σ_{pq} (A_n A_mᵀ)_{pq} g_{ncp}·g_{mdq}``, blocks ``m ≥ n``.

        Per ``n``: ``K_m = A_n A_mᵀ`` ``[P, P]``, ``W_m = K_mᵀ g_n`` ``[P, O·C]`` and
        ``block_m = W_mᵀ g_m`` ``[C, C]`` (batched over ``m ≥ n``), all as matrix
        products on one contiguous ``[N, P, O, C]`` copy of ``g``. Only the block upper
        triangle is computed; the rest follows by symmetry.
        """
        NS, C, P, O = g.shape
        upper = torch.zeros_like(gram)
        g_poc = g.permute(0, 2, 3, 1).contiguous()  # [NS, P, O, C]
        for n in range(NS):
            M = NS - n  # samples m = n, …, NS − 1
            # Kt[m, q, p] = (A_n A_mᵀ)[p, q]
            Kt = (A[n:].reshape(M * P, -1) @ A[n].T).reshape(M, P, P)
            W = torch.matmul(Kt, g_poc[n].reshape(P, O * C))  # [M, P_q, O·C]
            # block[m, c, d] = Σ_{q,o} W[m, q, o, c] g[m, d, q, o]
            block = torch.bmm(
                W.reshape(M, P * O, C).transpose(1, 2), g_poc[n:].reshape(M, P * O, C)
            )
            upper[n * C : (n + 1) * C, n * C :] = block.transpose(0, 1).reshape(
                C, M * C
            )
        # mirror the strictly upper blocks; diagonal blocks are complete
        strict = upper.clone()
        for n in range(NS):
            strict[n * C : (n + 1) * C, n * C : (n + 1) * C] = 0
        gram += upper + strict.T

    def _add_explicit_local(self, gram: Tensor, g: Tensor, A: Tensor) -> None:
        """``V_i = g_iᵀ A_{n(i)}`` in output-channel chunks, summed by ``syrk``."""
        NS, C, P, O = g.shape
        I = A.shape[-1]
        per_channel = NS * C * I * g.element_size()
        step = max(1, min(O, self.budget // max(1, 4 * per_channel)))
        gt = g.permute(0, 1, 3, 2)  # [NS, C, O, P]
        for o in range(0, O, step):
            part = gt[:, :, o : o + step].reshape(NS, -1, P)  # [NS, C·o, P]
            V = torch.bmm(part, A).reshape(NS * C, -1)  # [NC, o·I]
            symmetric_rank_k_update(gram, V)

    # ---------------------------------------------------------------- checking
    def products(self, weights: Tensor) -> Tensor:
        """``(V w_k)ᵀ`` for rows ``w_k`` of ``weights`` ``[K, NC]``: ``[K, D]``.

        Computed from the captured layer data, without a backward pass: for a local
        layer ``V w = Σ_n (Σ_c w_{nc} g_{nc})ᵀ A_n``; explicit blocks are multiplied.
        The self-check compares this with a direct vector-Jacobian product.
        """
        K, C = weights.shape[0], self.lin.num_columns_per_sample
        NS = self.lin.num_samples
        result: dict[int, Tensor] = {}
        for la in self.layers:
            if la.local:
                g = la.grad_matrix()  # [NC, P, O]
                P, O = g.shape[1:]
                # gw[n, (p, o), k] = Σ_c g[n·C + c, p, o] w[k, n·C + c]: [NS, P·O, K]
                gw = torch.bmm(
                    g.reshape(NS, C, P * O).transpose(1, 2),
                    weights.reshape(K, NS, C).permute(1, 2, 0),
                ).reshape(NS * P, O * K)
                if la.weight is not None:
                    A_s = la.A[self.lin.sample_index].reshape(NS * P, -1)  # [NS·P, I]
                    w_t = (A_s.T @ gw).reshape(-1, O, K)  # [I, O, K]
                    result[id(la.weight)] = w_t.permute(2, 1, 0).reshape(
                        K, *la.weight.shape
                    )
                if la.bias is not None:
                    result[id(la.bias)] = gw.sum(0).reshape(O, K).T
            else:
                flat = weights @ torch.cat(la.explicit)
                split = [p.numel() for p in la.params]
                for p, part in zip(la.params, flat.split(split, dim=1)):
                    result[id(p)] = part.reshape(K, *p.shape)
        for p, block in zip(self.generic, self.generic_blocks):
            result[id(p)] = (weights @ block).reshape(K, *p.shape)
        return self.lin.fmodel.flatten(
            [result[id(p)] for p in self.lin.fmodel.params], batch_dims=1
        )

    def _self_check(self, out: Tensor) -> bool:
        """``V w`` from the layer data equals a direct VJP, for a random ``w``."""
        gen = torch.Generator(device="cpu").manual_seed(1234)
        w = torch.randn(1, self.NC, generator=gen, dtype=out.dtype).to(out.device)
        direct = self.lin.vjp(self.lin.combine(w))[0]
        mine = self.products(w)[0]
        tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(out.dtype, 1e-2)
        # relative to the whole vector: a parameter with zero gradient (a bias before
        # BatchNorm) has only round-off, which must not count as a mismatch
        scale = max(direct.norm().item(), mine.norm().item(), 1e-30)
        return bool((direct - mine).norm() <= tol * scale)

    # ------------------------------------------------------------------- main
    def run(self) -> list[Tensor] | None:
        """One Gram matrix ``[NC, NC]`` per group, or ``None`` if the self-check fails."""
        out = self._forward()
        if self.lin.path.name == PER_SAMPLE:
            self.generic_blocks = self._backward_per_sample(out)
        else:
            self.generic_blocks = self._backward_full_batch(out)
        if not self._self_check(out):
            return None
        dtype, device = self.lin.outputs.dtype, self.lin.outputs.device
        grams = [
            torch.zeros(self.NC, self.NC, dtype=dtype, device=device)
            for _ in range(self.num_groups)
        ]
        for la in self.layers:
            if la.local:
                self._add_local(grams, la)
            else:
                block = torch.cat(la.explicit)  # [NC, D_l]: weight, then bias columns
                for p, part in zip(
                    la.params, block.split([p.numel() for p in la.params], 1)
                ):
                    symmetric_rank_k_update(grams[self.group_of[id(p)]], part)
            la.grads, la.explicit = [], []  # free as we go
        for p, block in zip(self.generic, self.generic_blocks):
            symmetric_rank_k_update(grams[self.group_of[id(p)]], block)
        return [0.5 * (gram + gram.T) for gram in grams]


class _Restart(Exception):
    """A layer turned out to mix samples after it was treated as local."""


def layerwise_gram(
    lin: Linearization,
    chunk: int = 64,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    groups: list[list[Tensor]] | None = None,
) -> tuple[list[Tensor] | None, str]:
    """Gram matrices of ``lin`` by layer-wise accumulation (see module docstring).

    Args:
        lin: The linearised model (its path decides how columns are backpropagated).
        chunk: Columns per batched backward pass on the full-batch path.
        memory_budget: Bytes allowed for explicit factor blocks and work buffers.
        groups: A partition of ``lin.fmodel.params``; one Gram ``V_gᵀ V_g`` per group
            (the GGN's diagonal blocks), all from the same backward passes. Default:
            one group of all parameters.

    Returns:
        ``(grams, note)``: a list of ``[NC, NC]`` Grams (one per group) or ``None``
        if the self-check failed (the caller then uses the generic engine), and a
        short description of how each layer was treated.
    """
    groups = [list(lin.fmodel.params)] if groups is None else groups
    forced: set[str] = set()
    for _ in range(64):
        engine = _Engine(lin, chunk, memory_budget, groups)
        for la in engine.layers:
            la.local = la.name not in forced
        try:
            with torch.enable_grad():
                grams = engine.run()
        except _Restart as err:
            forced.add(str(err))
            continue
        kinds = [
            f"{la.name or '<root>'}:{'local' if la.local else 'mixing'}"
            for la in engine.layers
        ]
        note = f"layer-wise ({', '.join(kinds) or 'no captured layers'}; {len(engine.generic)} other parameters explicit)"
        return grams, note
    raise RuntimeError("layer-wise engine did not converge on which layers mix samples")


__all__ = ["layerwise_gram", "symmetric_rank_k_update", "DEFAULT_MEMORY_BUDGET"]
