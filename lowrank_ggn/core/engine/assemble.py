r"""Assembly of the Gram matrices from one strategy's factors, block by block.

``𝒢_g = Σ_{p ∈ g} V_pᵀ V_p`` ``[NC, NC]`` for every parameter group ``g`` (rows
sample-major, ``i = n·C + c``), from what one strategy found
(:class:`~lowrank_ggn.core.engine.selfcheck.Factors`). Each parameter block is added
in the form its layer allows, and the layer's
:class:`~lowrank_ggn.core.engine.report.LayerTreatment` recorded:

* a sample-mixing layer: its explicit rows ``V_l`` ``[NC, D_l]``, split per
  parameter, each added by ``syrk`` (``MIXING``);
* a local layer: bias rows ``Σ_P g`` ``[NC, O]`` from the output gradients ``g``
  ``[NC, P, O]``; the weight in the form its operand's cost model favours within the
  memory budget, Kronecker or explicit rows (:mod:`~lowrank_ggn.core.engine.operands`,
  :func:`~lowrank_ggn.core.engine.accumulate.choose_form`);
* a layer upstream of BatchNorm statistics (``BN_SPLIT``): rows
  ``V_p = V_{f,p} + (B_p W)ᵀ``, frozen per-sample rows plus statistics directions
  ``B_p`` ``[2K, numel]`` weighted by ``W`` ``[2K, NC]``
  (:mod:`~lowrank_ggn.core.engine.batchnorm`), in chunks of explicit rows (``SPLIT``),
  or, where each row of ``B_p`` lives on one output channel and the cost model favours
  it, the Kronecker form of ``V_{f,p}`` plus the statistics terms
  (``SPLIT_KRONECKER``);
* BatchNorm affine parameters: the frozen rows
  :meth:`~lowrank_ggn.core.engine.batchnorm.BNLayer.affine_rows` plus ``(B_p W)ᵀ``
  (``SPLIT``);
* a parameter read by several captured calls (tied weights, a reused layer): the
  explicit rows of every use summed, plus its statistics rows, then one ``syrk``
  (``SHARED``);
* every other parameter: its generic rows ``[NC, numel]`` (``GENERIC``).

Every product runs in the Gram's dtype (the accumulation dtype, float64 from float32
factors by default; :mod:`lowrank_ggn.core.precision`): explicit rows are cast in
column chunks as ``syrk`` adds them, Kronecker operands once per layer. ``syrk``
adds into each Gram's lower triangle only, every other form adds a symmetric block;
at the end each lower triangle is mirrored into the upper one. A layer's factor
blocks are freed once they are added.

**Non-finite factors.** A NaN or Inf in a block reaches the diagonal of its Gram
(``𝒢_ii`` sums the squares of row ``i``'s entries); the diagonals are checked after
each layer, and only where one is not finite are that layer's factors scanned
(:func:`check_finite`: an error naming it, unless the Gram itself overflowed, which
:func:`~lowrank_ggn.core.spectrum.gram_eigh` reports). From there on, and for shared
parameters, every layer's factors are scanned before they are added.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from lowrank_ggn.core.budget import MemoryBudgetExceeded
from lowrank_ggn.core.engine import accumulate as acc
from lowrank_ggn.core.engine.layer import Layer
from lowrank_ggn.core.engine.operands import DenseOperand
from lowrank_ggn.core.engine.report import LayerTreatment
from lowrank_ggn.core.engine.selfcheck import Factors

#: ``(parameter, columns of its flattened entries, rows [NC, columns])``.
Entry = tuple[Tensor, slice | Tensor, Tensor]


class _GroupGrams:
    """One zero Gram ``[NC, NC]`` per parameter group, in dtype ``dtype``."""

    def __init__(
        self,
        groups: list[list[Tensor]],
        NC: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.grams = [torch.zeros(NC, NC, dtype=dtype, device=device) for _ in groups]
        self.group_of = {id(p): g for g, members in enumerate(groups) for p in members}

    def of(self, p: Tensor) -> Tensor:
        """The Gram of ``p``'s group."""
        return self.grams[self.group_of[id(p)]]

    def add_rows(self, p: Tensor, rows: Tensor) -> None:
        """``𝒢_{g(p)} += rows rowsᵀ`` for ``rows`` ``[NC, K]``, in the Gram's dtype.

        Lower triangle only (:func:`acc.lower_rank_k_update`, ``rows`` cast chunk by
        chunk); :meth:`finish` mirrors it. Every other addition is symmetric.
        """
        acc.lower_rank_k_update(self.of(p), rows)

    def finite_diagonals(self, params: list[Tensor]) -> bool:
        """Whether the diagonals of ``params``' Grams are finite (``O(NC)`` each).

        ``𝒢_ii`` sums the squares of row ``i``'s entries in every form: a NaN or
        Inf in a block's factors reaches the diagonal of its Gram.
        """
        ids = {self.group_of[id(p)] for p in params}
        sums = [self.grams[i].diagonal().sum() for i in ids]
        return bool(torch.stack(sums).isfinite().all()) if sums else True

    def finish(self) -> list[Tensor]:
        """The symmetric Grams: each lower triangle mirrored into its upper one."""
        for gram in self.grams:
            acc.mirror_lower(gram)
        return self.grams


def assemble_grams(
    f: Factors,
    groups: list[list[Tensor]],
    acc_dtype: torch.dtype,
    budget: int,
    treatments: dict[str, LayerTreatment],
) -> list[Tensor]:
    """Add every block of ``f`` into one Gram per group (see module docstring).

    Args:
        f: The factors of one strategy, checked by the self-check.
        groups: A partition of the parameters; one Gram per group.
        acc_dtype: dtype the Grams are summed in.
        budget: Bytes for work space (chunks of explicit rows, Kronecker buffers).
        treatments: Filled with each layer's treatment, by module or parameter name.

    Returns:
        One symmetric ``[NC, NC]`` Gram per group, dtype ``acc_dtype``.
    """
    lin = f.lin
    grams = _GroupGrams(groups, lin.num_columns, acc_dtype, lin.outputs.device)
    shared = _SharedRows(lin.fmodel.params, lin.num_columns, budget)
    finite = True  # the Grams so far: a layer's non-finite factors show on them
    for la in f.layers:
        if la.shared or not finite:
            check_finite(la)
        stats = [f.B.get(id(p)) for p in la.params] if f.W is not None else []
        if la.shared:
            for p, rows in zip(la.params, layer_rows(la, f, budget)):
                if id(p) in la.shared:
                    shared.add(p, rows)
                    continue
                extra = f.statistics_rows(p)
                grams.add_rows(p, rows if extra is None else rows + extra)
            treatments[la.name] = LayerTreatment.SHARED
        elif not la.local:
            block = torch.cat(la.explicit)
            for p, part in zip(
                la.params, block.split([p.numel() for p in la.params], 1)
            ):
                grams.add_rows(p, part)
            treatments[la.name] = LayerTreatment.MIXING
        elif any(s is not None for s in stats):
            treatments[la.name] = _add_split_layer(grams, la, f, budget)
        else:
            treatments[la.name] = _add_local(grams, la, f, budget)
        if finite and not grams.finite_diagonals(la.params):
            check_finite(la)  # raises, unless the Gram itself overflowed
            finite = False
        la.grads, la.explicit = [], []  # free as we go
    for p, rows in shared.items():  # Σ over uses, then once the statistics part
        extra = f.statistics_rows(p)
        grams.add_rows(p, rows if extra is None else rows + extra)
    for bn in f.bns:
        for p, rows in zip(bn.params, bn.affine_rows()):
            extra = f.statistics_rows(p)
            rows = rows if extra is None else rows + extra
            grams.add_rows(p, rows)
        if bn.params:
            treatments[bn.name] = LayerTreatment.SPLIT
    for p, rows in zip(f.generic, f.generic_rows):
        grams.add_rows(p, rows)
    record_generic(f, treatments)
    return grams.finish()


def record_generic(f: Factors, treatments: dict[str, LayerTreatment]) -> None:
    """Report the generic rows: a named layer's full-batch rows, else ``GENERIC``."""
    for name, p in zip(f.lin.fmodel.names, f.lin.fmodel.params):
        if id(p) in f.owners:
            treatments[f.owners[id(p)]] = LayerTreatment.MIXING
        elif any(p is q for q in f.generic):
            treatments.setdefault(name, LayerTreatment.GENERIC)


def held_bytes(f: Factors) -> int:
    """Bytes of the factors a strategy holds while the Gram (or ``Vᵀ``) is assembled.

    Plus the largest layer's output gradients once more: the assembly rearranges
    one layer's at a time.
    """
    tensors = [t for la in f.layers for t in la.grads + la.explicit]
    tensors += list(f.generic_rows) + list(f.B.values())
    tensors += [] if f.W is None else [f.W]
    copy = max(
        (t.numel() * t.element_size() for la in f.layers for t in la.grads), default=0
    )
    return copy + sum(t.numel() * t.element_size() for t in tensors)


def check_finite(la: Layer) -> None:
    """Raise a ``ValueError`` naming the layer if its factor blocks hold NaN or Inf."""
    for block in la.grads + la.explicit:
        if not torch.isfinite(block).all():
            raise ValueError(
                f"non-finite values (NaN or Inf) in the backpropagated factors at "
                f"layer {la.name!r}, the first captured layer where they appear: the "
                "model's output gradients overflow or are NaN for this batch. Check "
                "the inputs' scale and the model's numerics there."
            )


class _SharedRows:
    """Rows ``[NC, numel]`` of parameters read by several captured calls, summed."""

    def __init__(self, params: list[Tensor], NC: int, budget: int) -> None:
        self.by_id = {id(p): p for p in params}
        self.rows: dict[int, Tensor] = {}
        self.NC, self.budget = NC, budget

    def add(self, p: Tensor, rows: Tensor) -> None:
        """Add one use's rows of ``p``."""
        if id(p) in self.rows:
            self.rows[id(p)] += rows
            return
        held = sum(r.numel() * r.element_size() for r in self.rows.values())
        if held + rows.numel() * rows.element_size() > self.budget:
            raise MemoryBudgetExceeded(
                f"the rows of the shared parameters ([N·C={self.NC}, numel] each) "
                "exceed memory_budget; raise memory_budget or reduce the batch."
            )
        self.rows[id(p)] = rows.clone()

    def items(self) -> list[tuple[Tensor, Tensor]]:
        """``(parameter, summed rows)``."""
        return [(self.by_id[i], r) for i, r in self.rows.items()]


def layer_chunks(la: Layer, f: Factors, budget: int) -> Iterator[Entry]:
    """Yield ``(parameter, columns, rows)``: the layer's explicit rows ``[NC, ·]``.

    ``columns`` index the parameter's flattened entries; no statistics part. Mixing layers: their explicit blocks, whole (``slice(None)``). Local layers: the
    operand's explicit rows of every column, chunk by chunk (``complete``: every
    weight entry a statistics direction may reach), and the bias rows ``Σ_P g``.
    Kronecker layers too: their rows are never needed for the Gram, but ``Vᵀ`` is
    (:mod:`lowrank_ggn.core.engine.rows`).
    """
    if not la.local:
        block = torch.cat(la.explicit)  # [NC, D_l]
        for p, part in zip(la.params, block.split([p.numel() for p in la.params], 1)):
            yield p, slice(None), part
        return
    lin = f.lin
    NS, C = lin.num_samples, lin.num_columns_per_sample
    g = la.grad_matrix()  # [NC, P, O]
    NC, P, O = g.shape
    if la.weight is not None:
        operand = la.operand.select(lin.sample_index)
        chunks = operand.explicit(g.reshape(NS, C, P, O), budget // 4, complete=True)
        for cols, part in chunks:
            yield la.weight, cols, part
    if la.bias is not None:
        yield la.bias, slice(None), g.sum(1)


def layer_rows(la: Layer, f: Factors, budget: int) -> list[Tensor]:
    """Explicit rows ``[NC, numel]`` of each of the layer's parameters (no statistics).

    :func:`layer_chunks` laid out whole, per parameter.
    """
    rows: dict[int, Tensor] = {}
    for p, cols, part in layer_chunks(la, f, budget):
        if isinstance(cols, slice) and cols == slice(None):
            rows[id(p)] = part
            continue
        if id(p) not in rows:
            rows[id(p)] = part.new_zeros(part.shape[0], p.numel())
        rows[id(p)][:, cols] = part
    return [rows[id(p)] for p in la.params]


def _add_local(
    grams: _GroupGrams, la: Layer, f: Factors, budget: int
) -> LayerTreatment:
    """A local layer's ``V_lᵀ V_l`` in the form its operand's cost model favours."""
    lin = f.lin
    g = la.grad_matrix()  # [NC, P, O], parameters' dtype
    NS, C = lin.num_samples, lin.num_columns_per_sample
    NC, P, O = g.shape
    if la.bias is not None:
        grams.add_rows(la.bias, g.sum(1))  # bias rows [NC, O]
    if la.weight is None:
        return LayerTreatment.LOCAL_EXPLICIT
    gram = grams.of(la.weight)
    operand = la.operand.select(lin.sample_index)
    g = g.reshape(NS, C, P, O)
    costs = operand.costs(NS, C, gram.element_size())
    form = acc.choose_form(costs, budget)
    if form is LayerTreatment.KRONECKER:
        operand.add_kronecker(gram, g)
    else:
        for _, rows in operand.explicit(g, budget):
            grams.add_rows(la.weight, rows)
    return form


def _add_split_layer(
    grams: _GroupGrams, la: Layer, f: Factors, budget: int
) -> LayerTreatment:
    """``V_p = V_{f,p} + (B_p W)ᵀ``: Kronecker plus a correction, or explicit rows.

    Where every statistics direction reaching the weight lives on one output channel
    (its own BatchNorm's, :func:`row_channels`) and the operand's cost model favours
    the Kronecker form, ``V_{f,p} V_{f,p}ᵀ`` is added in that form and the rest by
    :func:`_add_channel_statistics` (``SPLIT_KRONECKER``); else chunks of explicit
    rows with ``(B_p W)ᵀ`` added, by ``syrk`` (``SPLIT``).
    """
    lin = f.lin
    NS, C = lin.num_samples, lin.num_columns_per_sample
    g = la.grad_matrix()
    NC, P, O = g.shape
    form = LayerTreatment.SPLIT
    if la.weight is not None:
        B = f.B.get(id(la.weight))
        WT = f.coefficients_for(la.weight)  # [NC, ·]: the coefficients B meets
        operand = la.operand.select(lin.sample_index)
        g4 = g.reshape(NS, C, P, O)
        gram = grams.of(la.weight)
        ks = row_channels(B, O) if isinstance(operand, DenseOperand) else None
        if ks is not None and not operand.transposed:
            costs = operand.costs(NS, C, gram.element_size())
            if acc.choose_form(costs, budget) is LayerTreatment.KRONECKER:
                operand.add_kronecker(gram, g4)
                _add_channel_statistics(gram, operand, g4, B, ks, WT, budget)
                form = LayerTreatment.SPLIT_KRONECKER
        if form is LayerTreatment.SPLIT:
            # chunks of at most budget/16: the rows plus syrk's work space; every
            # weight entry that B reaches lies in a chunk (complete)
            chunks = operand.explicit(g4, budget // 4, complete=True)
            for cols, rows in chunks:
                if B is not None:  # rows += (B_p W)ᵀ for these columns, in place
                    rows.addmm_(WT, B[:, cols])
                grams.add_rows(la.weight, rows)
    if la.bias is not None:
        rows = g.sum(1)
        extra = f.statistics_rows(la.bias)
        if extra is not None:
            rows = rows + extra
        grams.add_rows(la.bias, rows)
    return form


def row_channels(B: Tensor | None, O: int) -> Tensor | None:
    """The output channel each row of ``B`` ``[S, O·I]`` lives on, or ``None``.

    ``None`` where a row touches several channels of the weight ``[O, I]``; an empty
    index for ``B = None``; a zero row gets channel 0.
    """
    if B is None:
        return torch.zeros(0, dtype=torch.long)
    touched = B.reshape(B.shape[0], O, -1).ne(0).any(-1)  # [S, O]
    if bool((touched.sum(1) > 1).any()):
        return None
    return touched.to(torch.uint8).argmax(1)


def _add_channel_statistics(
    gram: Tensor,
    operand: DenseOperand,
    g: Tensor,
    B: Tensor | None,
    ks: Tensor,
    WT: Tensor | None,
    budget: int,
) -> None:
    r"""``𝒢 += Y Wᵀ + W Yᵀ + W (B Bᵀ) Wᵀ`` for statistics rows on one channel each.

    With ``V_f`` the frozen rows ``[NC, D]`` (already added as ``V_f V_fᵀ``), ``W``
    the coefficients ``WT`` ``[NC, S]`` and ``B`` ``[S, D]`` whose row ``s`` lives on
    output channel ``k_s`` alone (``b_s`` ``[I_g]`` there), ``(V_f + W B)(V_f + W
    B)ᵀ`` adds these terms. ``Y = V_f Bᵀ`` needs no explicit rows:
    ``Y_{(n,c), s} = Σ_p g_{ncp k_s} (A_{n p} · b_s)``, ``O(N·P·I·S + NC·P·S)``; ``B
    Bᵀ`` is ``b_s · b_t`` where ``k_s = k_t``. Everything in the Gram's dtype; the
    products ``A b`` and ``g`` are taken in chunks of rows within ``budget / 8``.
    """
    if B is None or B.shape[0] == 0:
        return
    dt = gram.dtype
    NS, C, P, O = g.shape
    S = B.shape[0]
    Og = operand.channels
    Bc = B.reshape(S, O, -1)[torch.arange(S, device=B.device), ks].to(dt)  # [S, I_g]
    js = ks // Og  # each row's group
    same = ks[:, None] == ks[None, :]
    M = 0.5 * (WT.to(dt) @ ((Bc @ Bc.T) * same))  # [NC, S]: ½ W (B Bᵀ)
    A = operand.A.to(dt)  # [NS, G, P, I_g]
    per_row = NS * P * (C + 1) * gram.element_size()
    step = max(1, (budget // 8) // max(1, per_row))
    for s0 in range(0, S, step):
        s1 = min(S, s0 + step)
        Ab = g.new_zeros(NS, P, s1 - s0, dtype=dt)
        for j in js[s0:s1].unique().tolist():
            sel = (js[s0:s1] == j).nonzero().squeeze(1)
            Ab[:, :, sel] = A[:, j] @ Bc[s0 + sel].T  # [NS, P, I_g] @ [I_g, ·]
        gk = g[..., ks[s0:s1]].to(dt)  # [NS, C, P, s]
        M[:, s0:s1] += torch.einsum("ncps,nps->ncs", gk, Ab).reshape(NS * C, -1)
    T = M @ WT.to(dt).T  # Y Wᵀ + ½ W B Bᵀ Wᵀ
    gram += T
    gram += T.T


__all__ = [
    "Entry",
    "assemble_grams",
    "check_finite",
    "held_bytes",
    "layer_chunks",
    "layer_rows",
    "record_generic",
]
