r"""Backpropagation strategies: how each column's layer-output gradients are found.

Each function runs backward passes on the graph of one captured forward pass (see
:mod:`lowrank_ggn.core.engine.capture`) and stores what it finds on the layer records;
the Gram matrix is then assembled by :mod:`lowrank_ggn.core.engine.assemble`. Shapes:
``NC = N_S·C`` columns, sample-major; a layer's output gradient is ``[NC, P, O]``.

* :func:`frozen_passes`: ``C`` backward passes of ``S[c]`` (all samples at once).
  Exact per-column gradients when the network is sample-independent, which it is
  for the per-sample path, and under :class:`~lowrank_ggn.core.engine.batchnorm.FreezeSwitch`
  for BatchNorm with its statistics held fixed.
* :func:`statistics_directions`: ``B = (J_θ m)ᵀ``, one batched backward pass per
  chunk of BatchNorm statistics ``m = (μ_l, r_l)``, from that layer down.
* :func:`column_passes`: chunks of columns ``e_n ⊗ s_nc`` through the whole batch.
* :func:`per_sample_generic_rows`: ``torch.func`` per-sample VJPs for parameters of
  no captured layer (per-sample path only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from lowrank_ggn.core.autodiff import batched_grad, per_sample_vjps
from lowrank_ggn.core.engine.batchnorm import BNLayer
from lowrank_ggn.core.engine.layer import Layer
from lowrank_ggn.core.engine.layers import channels_first
from lowrank_ggn.core.engine.report import EngineReport
from lowrank_ggn.core.engine.statistics import (
    BottomBatchNorm,
    FeedingConv,
    gradient_referrers,
)
from lowrank_ggn.core.memory import release_free_memory
from lowrank_ggn.core.progress import Tick

if TYPE_CHECKING:
    from lowrank_ggn.core.linearization import Linearization

#: Rough ratio of all intermediate activations to the captured layer outputs, used to
#: size the batches of full-batch backward passes.
AUTOGRAD_OVERHEAD = 6


class LayerTurnedMixing(Exception):
    """A layer treated as local turned out to mix samples; rerun with it explicit."""


def frozen_passes(
    lin: Linearization,
    out: Tensor,
    layers: list[Layer],
    bns: list[BNLayer],
    report: EngineReport,
    tick: Tick,
) -> None:
    """``C`` backward passes of ``S[c]``: per-column output gradients of every layer.

    Fills ``layer.grads`` (``[NC, P, O]``) and, for BatchNorm, ``bn.sums`` (``Σ_pos δ``
    and ``Σ_pos δ ⊙ x̂``, ``[NC, K]`` each) from the output cotangents ``δ``. Each pass
    copies its gradients once, into their place in ``[NS, C, P, O]``.
    """
    C = lin.num_columns_per_sample
    idx = lin.sample_index
    NS = idx.numel()
    whole = NS == lin.batch_size and torch.equal(
        idx, torch.arange(NS, device=idx.device)
    )
    full = lin.outputs.new_zeros(C, *lin.outputs.shape)
    full[:, idx] = lin.factors
    # gradient edges as recorded: in-place operations on the outputs later apart
    targets = [la.outputs[0] for la in layers] + [bn.output for bn in bns]
    edges = [la.target for la in layers] + [bn.target for bn in bns]
    shapes = [la.output_grad(la.outputs[0].detach()[None]).shape[2:] for la in layers]
    stores = [la.outputs[0].new_empty(NS, C, *pq) for la, pq in zip(layers, shapes)]
    sums = [
        (
            bn.output.new_empty(NS, C, bn.channels),
            bn.output.new_empty(NS, C, bn.channels),
        )
        for bn in bns
    ]
    live = [e for t, e in zip(targets, edges) if t.requires_grad]  # a BN below all
    for c in range(C):
        found = iter(
            torch.autograd.grad(
                out, live, full[c], retain_graph=True, allow_unused=True
            )
            if live
            else []
        )
        grads = [next(found) if t.requires_grad else None for t in targets]
        for store, la, g in zip(stores, layers, grads):
            if g is None:  # dead branch
                store[:, c].zero_()
                continue
            g = la.output_grad(g.unsqueeze(0))[0]  # [N, P, O], a view
            store[:, c].copy_(g if whole else g[idx])  # [NS, P, O]
        for (s_d, s_dx), bn, g in zip(sums, bns, grads[len(layers) :]):
            g = torch.zeros_like(bn.output) if g is None else g  # [N, K, *pos]
            K = bn.channels
            s_d[:, c] = g[idx].reshape(NS, K, -1).sum(2)
            s_dx[:, c] = (g * bn.xhat)[idx].reshape(NS, K, -1).sum(2)
        report.count("backward")
        tick(1)
    for store, la in zip(stores, layers):
        la.grads = [store.flatten(0, 1)]  # [NS·C, P, O], a view
    for (s_d, s_dx), bn in zip(sums, bns):
        bn.sums = ([s_d.flatten(0, 1)], [s_dx.flatten(0, 1)])


def statistics_directions(
    bns: list[BNLayer],
    layers: list[Layer],
    others: list[Tensor],
    activations_below: list[int],
    budget: int,
    report: EngineReport,
    tick: Tick,
) -> tuple[dict[int, Tensor], dict[int, int]]:
    """``B_p = (J_{θ_p} m)ᵀ`` per parameter (absent: zero), and where its rows start.

    Rows follow :meth:`BNLayer.coefficients`, layer by layer: ``μ`` then ``r``. A
    parameter is reached only by the statistics of the BatchNorm layers above it:
    ``B_p`` holds rows ``s_p … 2K − 1`` (``[2K − s_p, numel(θ_p)]``, ``s_p`` the first
    row that reaches it), so products with it touch no block of zeros. Where
    a captured convolution feeds the BatchNorm (:class:`FeedingConv`), its own rows
    are closed form and the backward passes start at its input ``h`` with the
    directions' cotangents there; elsewhere they start at the statistics. Either
    way they run through the true graph below (lower BatchNorm layers included), a
    chunk of directions at a time, to the *outputs* of the captured layers and to
    the other parameters (``others``); a captured layer's rows then come from its
    operand for the whole chunk (:meth:`Layer.param_rows`). Passes of higher
    directions end at the output of a bottom BatchNorm (:class:`BottomBatchNorm`),
    whose convolution's and affine parameters' rows then come from there.
    ``"statistics"`` counts the directions backpropagated (none where nothing below
    ``h`` needs gradients).
    """
    K_total = sum(bn.num_statistics for bn in bns)
    rows: dict[int, Tensor] = {}
    starts: dict[int, int] = {}  # the BatchNorm layers come in forward order
    selected = {id(p) for la in layers for p in la.params} | {id(p) for p in others}
    feeds = [
        FeedingConv.find(bn, layers, selected) if bn.mean.requires_grad else None
        for bn in bns
    ]
    # passes of higher directions end at a bottom BatchNorm's output
    refs = gradient_referrers([bn.mean.grad_fn for bn in bns])
    bottoms = {}
    for feed in feeds:
        bottom = BottomBatchNorm.find(feed, refs)
        if bottom is not None:
            bottoms[id(bottom.feed.layer)] = bottom
    ends = {id(p) for b in bottoms.values() for p in b.feed.bn.params}
    others = [p for p in others if id(p) not in ends]  # rows from the bottoms' sums
    targets = [la.target for la in layers] + others
    for i, la in enumerate(layers):
        if id(la) in bottoms:
            targets[i] = bottoms[id(la)].target
    # channel-major buffers: the weight rows' GEMM reads them without a copy
    major = [not la.functional and channels_first(la.module) for la in layers]

    def store(p: Tensor, lo: int, block: Tensor) -> None:
        if id(p) not in rows:  # the lowest row that reaches p comes first
            starts[id(p)] = lo
            rows[id(p)] = p.new_zeros(K_total - lo, p.numel())
        # added: a parameter read by several captured calls gets a block from each
        lo -= starts[id(p)]
        rows[id(p)][lo : lo + block.shape[0]] += block.reshape(block.shape[0], -1)

    offset = 0
    for bn, acts, feed in zip(bns, activations_below, feeds):
        K = bn.channels
        if feed is not None:
            bottom = bottoms.get(id(feed.layer))
            own = feed.own_rows() if bottom is None else bottom.own
            for p, block in zip(feed.layer.params, own):
                store(p, offset, block)
        if not bn.mean.requires_grad or (feed is not None and feed.edge is None):
            tick(2 * K)  # no parameter below (closed form, or none at all)
            offset += 2 * K
            continue
        item = bn.output.element_size()
        # the chunk's gradients at the layer outputs below, and one rearranged copy
        per_direction = 2 * max(1, acts) * item
        step = int(max(1, min(2 * K, (budget // 8) // per_direction)))
        for start in range(0, 2 * K, step):
            stop = min(2 * K, start + step)
            # a bottom BatchNorm's rows, one direction at a time as its pass ends
            ended = {
                i: _ended(bottoms[id(la)], offset + start, store)
                for i, la in enumerate(layers)
                if id(la) in bottoms
            }
            if feed is not None:
                cot = [feed.input_cotangents(start, stop)]
                grads = _chunk_grads([feed.edge], targets, cot, major, ended)
            else:
                eye = bn.output.new_zeros(stop - start, 2 * K)
                eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
                cot = [eye[:, :K], eye[:, K:]]
                grads = _chunk_grads([bn.mean, bn.inv_std], targets, cot, major, ended)
            for la, g in zip(layers, grads):
                if g is None:
                    continue
                g = la.output_grad(g)  # [B, N, P, O]
                if id(la) in bottoms:  # g: the cotangents at its BatchNorm's output
                    blocks, affine = bottoms[id(la)].rows(g)
                    for p, block in zip(bottoms[id(la)].feed.bn.params, affine):
                        store(p, offset + start, block)
                elif la.outputs[0] is bn.input:
                    # the layer feeding the BatchNorm: direction j lives on channel
                    # j mod K of its output, so only that row of its weight is hit
                    ks = torch.arange(start, stop, device=g.device) % K
                    blocks = _channel_rows(la, g, ks)
                else:
                    blocks = la.param_rows(g)
                for p, block in zip(la.params, blocks):
                    store(p, offset + start, block)
            for p, g in zip(others, grads[len(layers) :]):
                if g is not None:
                    store(p, offset + start, g)
            report.count("statistics", stop - start)
            tick(stop - start)
        offset += 2 * K
    return rows, starts


def _ended(bottom: BottomBatchNorm, lo: int, store: Callable) -> Callable:
    """Store the rows of direction ``lo + b`` ending at ``bottom``: ``(b, g) -> None``."""

    def add(b: int, g: Tensor) -> None:
        blocks, affine = bottom.direction_rows(g)
        params = bottom.feed.layer.params + bottom.feed.bn.params
        for p, block in zip(params, blocks + affine):
            store(p, lo + b, block[None])

    return add


def _chunk_grads(
    outputs: list[Tensor | GradientEdge],
    targets: list[Tensor | GradientEdge],
    cotangents: list[Tensor],
    channel_major: list[bool] = (),
    direct: dict[int, Callable[[int, Tensor], None]] | None = None,
) -> list[Tensor | None]:
    """``[B, *target]`` gradients of a chunk of ``B`` cotangents ``[B, *output]``.

    On CPUs one backward pass per cotangent, each copied into its place in the
    chunk's buffers; elsewhere one batched pass (:func:`batched_grad`). A target that
    no output reaches gives ``None``. ``channel_major[i]``: target ``i`` is a
    channels-first output ``[N, O, *pos]`` whose buffer is laid out ``[B, O, N,
    *pos]`` in memory (the copy transposes, so that the weight rows' product
    ``[B·O, N·P] @ [N·P, I]`` and the bias sums read it without another copy).
    ``direct[i]`` (CPUs): target ``i``'s gradient of cotangent ``b`` goes to
    ``direct[i](b, g)`` as the pass ends, not to a buffer (its entry is ``None``).
    """
    if cotangents[0].device.type != "cpu":
        return batched_grad(outputs, targets, cotangents)
    direct = direct or {}
    B = cotangents[0].shape[0]
    found: list[Tensor | None] = [None] * len(targets)
    filled: list[list[int]] = [[] for _ in targets]
    for b in range(B):
        grads = torch.autograd.grad(
            outputs,
            targets,
            [c[b] for c in cotangents],
            retain_graph=True,
            allow_unused=True,
        )
        for i, g in enumerate(grads):
            if g is None:
                continue
            if i in direct:
                direct[i](b, g)
                continue
            if found[i] is None and i < len(channel_major) and channel_major[i]:
                found[i] = g.new_empty(B, g.shape[1], g.shape[0], *g.shape[2:])
                found[i] = found[i].transpose(1, 2)  # [B, N, O, *pos]
            elif found[i] is None:
                found[i] = g.new_empty(B, *g.shape)
            found[i][b].copy_(g)
            filled[i].append(b)
    for buf, done in zip(found, filled):
        if buf is not None and len(done) < B:  # unreached for some directions
            missing = sorted(set(range(B)) - set(done))
            buf[missing] = 0
    return found


def _channel_rows(la: Layer, g: Tensor, ks: Tensor) -> list[Tensor]:
    """Rows ``[B, numel]`` of directions that each live on one output channel ``ks[b]``.

    ``g`` ``[B, N, P, O]`` vanishes except on channel ``ks[b]`` for direction ``b``; a
    dense weight's gradient is then one row, ``Σ_{n,p} g[b, n, p, k] A_{n,p}``.
    """
    rows = la.operand.channel_rows(g, ks) if la.weight is not None else None
    if rows is None:
        return la.param_rows(g)
    B = g.shape[0]
    blocks = [rows]
    if la.bias is not None:
        full = g.new_zeros(B, g.shape[-1])
        native = g.transpose(2, 3)  # [B, N, O, P], as autograd produced it
        sums = torch.stack([native[b, :, k].sum() for b, k in enumerate(ks.tolist())])
        full[torch.arange(B, device=g.device), ks] = sums
        blocks.append(full)
    return blocks


def column_passes(
    lin: Linearization,
    out: Tensor,
    layers: list[Layer],
    generic: list[Tensor],
    chunk: int,
    check_budget: Callable[[], None],
    report: EngineReport,
    tick: Tick,
) -> list[Tensor]:
    """Chunks of columns through the whole batch; returns generic rows ``[NC, ·]``.

    A layer whose output gradient for column ``i`` vanishes off sample ``n(i)`` keeps
    only ``g_i`` (local); any other layer keeps explicit rows (mixing).
    """
    NC = lin.num_columns
    col_sample = lin.sample_index.repeat_interleave(lin.num_columns_per_sample)
    targets = [la.target for la in layers] + generic
    generic_rows: list[list[Tensor]] = [[] for _ in generic]
    for start in range(0, NC, chunk):
        stop = min(NC, start + chunk)
        weights = out.new_zeros(stop - start, NC)
        weights[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        grads = batched_grad(out, targets, lin.combine(weights))
        rows = torch.arange(stop - start, device=out.device)
        own = col_sample[start:stop]
        for la, g in zip(layers, grads[: len(layers)]):
            if g is None:  # output never reaches the model output
                g = out.new_zeros(stop - start, *la.outputs[0].shape)
            g = la.output_grad(g)  # [B, N, P, O]
            if la.local:
                off = g.clone()
                off[rows, own] = 0
                if torch.count_nonzero(off) == 0:
                    la.grads.append(g[rows, own].clone())  # [B, P, O]
                    continue
                la.local = False
                if la.grads:
                    raise LayerTurnedMixing(la.name)
            la.explicit.append(la.explicit_block(g).clone())
        for store, g, p in zip(generic_rows, grads[len(layers) :], generic):
            g = p.new_zeros(stop - start, *p.shape) if g is None else g
            store.append(g.reshape(stop - start, -1).clone())
        check_budget()
        report.count("backward", stop - start)
        tick(stop - start)
        if out.device.type == "cpu" and (start // chunk) % 4 == 3:
            release_free_memory()  # see lowrank_ggn.core.memory
    return [torch.cat(r) for r in generic_rows]


def per_sample_generic_rows(
    lin: Linearization, generic: list[Tensor], chunk: int
) -> list[Tensor]:
    """Per-sample VJPs w.r.t. the parameters of no captured layer: ``[NC, numel]``."""
    if not generic:
        return []
    fm = lin.fmodel.restricted(generic)
    C = lin.num_columns_per_sample
    S = lin.factors.movedim(0, 1)  # [NS, C, *out]
    X = lin.inputs.select(lin.sample_index)
    per = max(1, chunk // C)
    rows: list[list[Tensor]] = [[] for _ in generic]
    for start in range(0, X.size, per):
        stop = start + per
        res = per_sample_vjps(
            fm, X.select(slice(start, stop)), S[start:stop], columns=True
        )
        for store, r in zip(rows, res):
            store.append(r.reshape(r.shape[0] * r.shape[1], -1))  # 0-dim params too
    lin.fmodel.samples_processed += fm.samples_processed
    return [torch.cat(r) for r in rows]


__all__ = [
    "AUTOGRAD_OVERHEAD",
    "LayerTurnedMixing",
    "column_passes",
    "frozen_passes",
    "per_sample_generic_rows",
    "statistics_directions",
]
