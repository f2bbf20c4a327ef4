r"""Per-layer operands: how a captured layer's parameter rows arise from its factors.

Every captured layer's weight gradient for one column is bilinear in a per-sample
input-side operand (stored once per layer) and the column's output gradient
``g`` ``[P, O]`` (``P`` positions, ``O`` output channels). An operand knows three
things about its layer: the weight rows of any gradients (:meth:`weight_rows`, for
full-batch columns, statistics directions and the self-check), the cost of each exact
Gram form (:meth:`costs`), and how to add the Gram in that form
(:meth:`add_kronecker`, :meth:`explicit`).

* :class:`DenseOperand`: inputs ``A`` ``[N, G, P, I_g]`` in ``G`` groups; per group
  ``W_j = Σ_p g_{pj}ᵀ A_{pj}`` ``[O_g, I_g]`` (Linear over any leading positions,
  grouped/depthwise convolutions of any dimension). *Transposed* (ConvTranspose):
  ``W_j = Σ_p A_{pj}ᵀ U_{pj}`` ``[I_g, O_g]`` where ``U`` unfolds the output gradient
  at the input positions.
* :class:`IndexOperand`: an embedding ``W`` ``[V, E]``, a Linear of one-hot inputs:
  ``W = Σ_p e_{idx_p} g_pᵀ`` (bags of tokens for ``EmbeddingBag``); Gram terms are
  index matches, never dense one-hots.
* :class:`ElementwiseOperand`: a normalisation's ``γ``: ``Σ_p g_p ⊙ x̂_p``.

A bias is ``Σ_p g_p`` for all of them (:meth:`lowrank_ggn.core.engine.capture.Layer.param_rows`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from lowrank_ggn.core.engine import accumulate as acc
from lowrank_ggn.core.engine.matches import (
    MATCH_WORK_BYTES,
    add_token_matches,
    match_count,
)
from lowrank_ggn.core.engine.report import LayerTreatment

#: ``(columns of the flattened weight, rows [NC, columns])``.
Chunk = tuple[slice | Tensor, Tensor]


@dataclass
class DenseOperand:
    """Inputs ``A`` ``[N, G, P, I_g]``; weights ``[G·O_g, I_g]`` (``[G·I_g, O_g]``).

    Attributes:
        A: Layer inputs by group (unfolded for convolutions), contiguous.
        channels: Output channels per group (of ``g``, before ``patches``).
        transposed: Weight layout ``[I, O_g]`` (ConvTranspose) instead of ``[O, I_g]``.
        patches: ConvTranspose only: output gradients of some channels ``[*, P_out,
            c]`` -> their patches at the input positions ``[*, P, c·K]``.
        width: ``O_g``, per group the width of the output-side operand (``channels``,
            times the kernel size ``K`` for ConvTranspose).
    """

    A: Tensor
    channels: int
    transposed: bool = False
    patches: Callable[[Tensor], Tensor] | None = None
    width: int = 0

    def __post_init__(self) -> None:
        self.width = self.width or self.channels

    @property
    def groups(self) -> int:
        """``G``."""
        return self.A.shape[1]

    def select(self, idx: Tensor) -> DenseOperand:
        """The operand of the samples ``idx``."""
        return DenseOperand(
            self.A[idx], self.channels, self.transposed, self.patches, self.width
        )

    def grads(self, g: Tensor, j0: int, j1: int) -> Tensor:
        """Output-side operand of groups ``j0…j1−1``: ``[*, P, O]`` -> ``[*, P, (j1−j0)·O_g]``."""
        part = g[..., j0 * self.channels : j1 * self.channels]
        return part if self.patches is None else self.patches(part)

    def weight_rows(self, g: Tensor) -> Tensor:
        """``Σ_n`` weight gradients of ``B`` columns ``g`` ``[B, N, P, O]``: ``[B, D]``.

        One product per group for all ``B`` columns, with the samples and positions
        as the inner dimension, ``[B·O_g, N·P] @ [N·P, I_g]`` (transposed layouts
        ``[I_g, N·P] @ [N·P, B·O_g]``): the sum over ``N`` happens inside the GEMM,
        never as ``N`` per-sample gradients, and ``A`` is read once per chunk.
        """
        N, G, P, Ig = self.A.shape
        B, w = g.shape[0], self.width
        A = self.A.transpose(0, 1).reshape(G, N * P, Ig)  # a view when G = 1
        U = self.grads(g, 0, G).reshape(B, N, P, G, w)
        if self.transposed:  # [G, I_g, N·P] @ [G, N·P, B·O_g]
            right = U.permute(3, 1, 2, 0, 4).reshape(G, N * P, B * w)
            out = torch.bmm(A.transpose(1, 2), right).reshape(G, Ig, B, w)
            return out.permute(2, 0, 1, 3).reshape(B, -1)
        # [G, B·O_g, N·P] @ [G, N·P, I_g]
        left = U.permute(3, 0, 4, 1, 2).reshape(G, B * w, N * P)
        out = torch.bmm(left, A).reshape(G, B, w, Ig)
        return out.transpose(0, 1).reshape(B, -1)

    def channel_rows(self, g: Tensor, ks: Tensor) -> Tensor | None:
        """Weight rows ``[B, D]`` of columns that live on one output channel ``ks[b]``.

        Only row ``ks[b]`` of the weight is hit: ``Σ_{n,p} g[b, n, p, k] A_{n,p,j(k)}``.
        ``None`` for transposed layouts (use :meth:`weight_rows`).
        """
        if self.transposed:
            return None
        B, N, P, O = g.shape
        Ig = self.A.shape[-1]
        native = g.transpose(2, 3)  # [B, N, O, P], as autograd produced it
        gk = torch.stack([native[b, :, k] for b, k in enumerate(ks.tolist())])
        js = ks // self.channels
        w = g.new_zeros(B, Ig)
        for j in js.unique().tolist():
            sel = js == j
            w[sel] = gk[sel].reshape(-1, N * P) @ self.A[:, j].reshape(N * P, Ig)
        full = g.new_zeros(B, O, Ig)
        full[torch.arange(B, device=g.device), ks] = w
        return full.reshape(B, -1)

    def costs(self, NS: int, C: int, item: int) -> acc.Costs:
        """Flops and work space of the Kronecker and explicit forms."""
        _, G, P, Ig = self.A.shape
        D = G * Ig * self.width
        kron, memory = acc.kron_costs(NS, C, P, self.width, NS * NS * P * P * Ig, item)
        return {
            LayerTreatment.KRONECKER: (G * kron, memory),
            LayerTreatment.LOCAL_EXPLICIT: (
                acc.explicit_cost(NS * C, P, D, D),
                0.0,
            ),
        }

    def add_kronecker(self, gram: Tensor, g: Tensor) -> None:
        """``𝒢 += Σ_j`` Kronecker blocks of group ``j``, for ``g`` ``[NS, C, P, O]``."""
        NS, C = g.shape[:2]
        balanced = acc.balanced(self.A, g, gram.dtype)  # scale before squaring
        if balanced is None:  # a zero side: every block is zero
            return
        A, g = balanced
        upper = None
        for j in range(self.groups):
            gj, Aj = (
                self.grads(g, j, j + 1),
                A[:, j],
            )  # [NS, C, P, O_g], [NS, P, I_g]
            if Aj.shape[1] == 1:
                A1 = Aj[:, 0].to(gram.dtype)
                acc.add_kernel_product(gram, gj[:, :, 0], A1 @ A1.T)
                continue
            if upper is None:
                upper = torch.zeros_like(gram)
            acc.kron_upper(upper, gj, acc.input_kernel(Aj, gram.dtype))
        if upper is not None:
            acc.mirror_blocks(gram, upper, C)

    def explicit(
        self, g: Tensor, budget: int, complete: bool = False
    ) -> Iterator[Chunk]:
        """Yield ``(columns, rows)``: explicit weight rows ``[NS·C, ·]`` in chunks.

        Chunks are whole groups, or slices of the weight's leading dimension inside
        one group when a group alone exceeds ``budget`` (at least one row each).
        """
        NS, C = g.shape[:2]
        G, Ig, Og = self.groups, self.A.shape[-1], self.width
        lead, trail = (Ig, Og) if self.transposed else (Og, Ig)
        per_row = NS * C * trail * g.element_size()
        step = max(1, budget // max(1, 4 * per_row))
        if step >= lead:
            gs = max(1, step // lead)
            for j0 in range(0, G, gs):
                j1 = min(G, j0 + gs)
                cols = slice(j0 * lead * trail, j1 * lead * trail)
                yield cols, self._block(g, j0, j1, 0, lead)
            return
        for j in range(G):
            for l0 in range(0, lead, step):
                l1 = min(lead, l0 + step)
                cols = slice((j * lead + l0) * trail, (j * lead + l1) * trail)
                yield cols, self._block(g, j, j + 1, l0, l1)

    def _block(self, g: Tensor, j0: int, j1: int, l0: int, l1: int) -> Tensor:
        """Rows of groups ``j0…j1−1``, leading weight rows ``l0…l1−1`` of each."""
        U = self.grads(g, j0, j1)  # [NS, C, P, Gc·O_g]
        NS, C, P = U.shape[:3]
        Gc, a = j1 - j0, l1 - l0
        U = U.reshape(NS, C, P, Gc, self.width)
        A = self.A[:, j0:j1]  # [NS, Gc, P, I_g]
        if self.transposed:
            # rows[n, c, j, i, o] = Σ_p A[n, j, p, i] U[n, c, p, j, o]
            right = U.permute(0, 3, 2, 1, 4).reshape(NS * Gc, P, C * self.width)
            left = A[..., l0:l1].reshape(NS * Gc, P, a).transpose(1, 2)
            out = torch.bmm(left, right).reshape(NS, Gc, a, C, self.width)
            return out.permute(0, 3, 1, 2, 4).reshape(NS * C, -1)
        # rows[n, c, j, o, i] = Σ_p U[n, c, p, j, o] A[n, j, p, i]
        left = U[..., l0:l1].permute(0, 3, 1, 4, 2).reshape(NS * Gc, C * a, P)
        out = torch.bmm(left, A.reshape(NS * Gc, P, -1))  # [NS·Gc, C·a, I_g]
        return out.reshape(NS, Gc, C, -1).transpose(1, 2).reshape(NS * C, -1)


@dataclass
class IndexOperand:
    """Token indices of an embedding ``W`` ``[V, E]``: bags ``idx`` ``[N, P, L]``.

    Output position ``p`` of sample ``n`` is ``Σ_l a_{npl} W[idx_{npl}]``: one token
    with ``a = 1`` for ``Embedding`` (``L = 1``), a bag of ``L`` tokens for
    ``EmbeddingBag`` (``P = 1``; ``a`` = 1, ``1/|bag|`` or the per-sample weights).
    ``a = 0`` marks padding (``padding_idx``, short bags): no gradient.

    Attributes:
        idx: Token indices.
        coef: The coefficients ``a``, in the layer's dtype.
        num_embeddings: ``V``; ``dim``: ``E``.
        batch_tokens: The sorted distinct tokens (``a ≠ 0``) of the whole batch.
        match_pairs: ``Σ_t (reads of t)²`` (:func:`~lowrank_ggn.core.engine.matches.match_count`),
            counted on first use.
    """

    idx: Tensor
    coef: Tensor
    num_embeddings: int
    dim: int
    batch_tokens: Tensor
    match_pairs: int | None = None  # ordered pairs of equal-token reads, once counted

    def select(self, idx: Tensor) -> IndexOperand:
        """The operand of the samples ``idx``."""
        return IndexOperand(
            self.idx[idx],
            self.coef[idx],
            self.num_embeddings,
            self.dim,
            self.batch_tokens,
        )

    def tokens(self) -> Tensor:
        """Sorted distinct tokens (``a ≠ 0``) of these samples."""
        return torch.unique(self.idx[self.coef != 0])

    def weight_rows(self, g: Tensor) -> Tensor:
        """``Σ_{n,p,l} a_{npl} e_{idx_{npl}} g_{b,n,p}ᵀ`` for ``g`` ``[B, N, P, E]``: ``[B, V·E]``."""
        B = g.shape[0]
        out = g.new_zeros(B, self.num_embeddings, self.dim)
        src = g[:, :, :, None, :] * self.coef[None, :, :, :, None]  # [B, N, P, L, E]
        out.index_add_(1, self.idx.reshape(-1), src.reshape(B, -1, self.dim))
        return out.reshape(B, -1)

    def channel_rows(self, g: Tensor, ks: Tensor) -> None:
        """Not specialised: use :meth:`weight_rows`."""
        return None

    def _kernel(self, dtype: torch.dtype) -> acc.Kernel:
        """``k_{nm}[p, q] = Σ_{l,l'} a_{npl} a_{mql'} [idx_{npl} = idx_{mql'}]``."""
        idx, coef = self.idx, self.coef.to(dtype)

        def kernel(n: int) -> Tensor:
            # match[m, q, l', p, l]: [M, P, L, P, L]
            match = idx[n:, :, :, None, None] == idx[n][None, None, None]
            weights = coef[n:, :, :, None, None] * coef[n][None, None, None]
            return (match * weights).sum(dim=(2, 4))  # [M, P_q, P_p]

        return kernel

    def costs(self, NS: int, C: int, item: int) -> acc.Costs:
        """Kronecker (index matches) against explicit rows over the batch's tokens."""
        P, L = self.idx.shape[1:]
        E, used = self.dim, self.tokens().numel()
        return {
            LayerTreatment.KRONECKER: self._kron_costs(NS, C, item),
            LayerTreatment.LOCAL_EXPLICIT: (
                acc.explicit_cost(NS * C, P * L, E, used * E),
                0.0,
            ),
        }

    def _kron_costs(self, NS: int, C: int, item: int) -> tuple[float, float]:
        """``(flops, bytes)`` of the form :meth:`_by_matches` picks."""
        P, L = self.idx.shape[1:]
        if self._by_matches(NS, C):
            return self._match_flops(C), float(MATCH_WORK_BYTES)
        return acc.kron_costs(NS, C, P, self.dim, NS * NS * P * P * L * L, item)

    def _by_matches(self, NS: int, C: int) -> bool:
        """Whether the token matches cost fewer flops than the dense index kernels.

        Only for several positions (:mod:`~lowrank_ggn.core.engine.matches`).
        """
        P, L = self.idx.shape[1:]
        if P == 1:
            return False
        dense = acc.kron_costs(NS, C, P, self.dim, NS * NS * P * P * L * L, 1)[0]
        return self._match_flops(C) < dense

    def _match_flops(self, C: int) -> float:
        """``M·C·E·(C + 2)`` for the ``M`` ordered pairs of reads of equal tokens."""
        if self.match_pairs is None:
            self.match_pairs = match_count(self.idx, self.coef)
        return float(self.match_pairs * C * self.dim * (C + 2))

    def add_kronecker(self, gram: Tensor, g: Tensor) -> None:
        """``𝒢 += Σ_{pq} k_{pq} ⟨g_{ncp}, g_{mdq}⟩`` for ``g`` ``[NS, C, P, E]``.

        From the token matches where :meth:`_by_matches` says so.
        """
        if self._by_matches(*g.shape[:2]):
            add_token_matches(gram, g, self.idx, self.coef)
            return
        if self.idx.shape[1] == 1:
            i, a = self.idx[:, 0], self.coef[:, 0].to(gram.dtype)  # [NS, L]
            # K[n, m] = Σ_{l,l'} a_{nl} a_{ml'} [idx_{nl} = idx_{ml'}]
            match = i[:, :, None, None] == i[None, None]  # [NS, L, NS, L]
            K = (match * a[:, :, None, None] * a[None, None]).sum(dim=(1, 3))
            acc.add_kernel_product(gram, g[:, :, 0], K)
            return
        acc.add_kron_blocks(gram, g, self._kernel(gram.dtype))

    def explicit(
        self, g: Tensor, budget: int, complete: bool = False
    ) -> Iterator[Chunk]:
        """Rows restricted to the embedding rows of the samples' tokens, in chunks.

        Every other row of the weight gradient is zero. ``complete``: cover the
        tokens of the whole batch (statistics directions reach those too).
        """
        NS, C, P, E = g.shape
        L = self.idx.shape[2]
        tokens = self.batch_tokens if complete else self.tokens()
        last = max(0, tokens.numel() - 1)
        slot = torch.searchsorted(tokens, self.idx).clamp_(max=last).reshape(-1)
        coef = self.coef.reshape(-1)
        used = coef != 0
        sample = torch.arange(NS, device=g.device).repeat_interleave(P * L)
        # one source row per (n, p, l): a_{npl} g_{n,:,p} as [NS·P·L, C·E]
        src = g.permute(0, 2, 1, 3).reshape(NS, P, 1, C * E) * self.coef[..., None]
        src = src.reshape(NS * P * L, C * E)
        step = max(1, budget // max(1, 4 * NS * C * E * g.element_size()))
        offsets = torch.arange(E, device=g.device)
        for t0 in range(0, tokens.numel(), step):
            w = min(tokens.numel(), t0 + step) - t0
            keep = used & (slot >= t0) & (slot < t0 + w)
            dest = g.new_zeros(NS * w, C * E)
            dest.index_add_(0, sample[keep] * w + slot[keep] - t0, src[keep])
            rows = dest.reshape(NS, w, C, E).permute(0, 2, 1, 3).reshape(NS * C, -1)
            cols = (tokens[t0 : t0 + w, None] * E + offsets).reshape(-1)
            yield cols, rows


@dataclass
class ElementwiseOperand:
    """A normalisation's normalised input ``x̂`` ``[N, P, O]``: ``γ`` rows ``Σ_p g ⊙ x̂``."""

    xhat: Tensor

    @property
    def width(self) -> int:
        """``O``, the parameter's entries."""
        return self.xhat.shape[-1]

    def select(self, idx: Tensor) -> ElementwiseOperand:
        """The operand of the samples ``idx``."""
        return ElementwiseOperand(self.xhat[idx])

    def weight_rows(self, g: Tensor) -> Tensor:
        """``Σ_{n,p} g_{b,n,p} ⊙ x̂_{n,p}`` for ``g`` ``[B, N, P, O]``: ``[B, O]``."""
        return torch.einsum("bnpo,npo->bo", g, self.xhat)

    def channel_rows(self, g: Tensor, ks: Tensor) -> None:
        """Not specialised: use :meth:`weight_rows`."""
        return None

    def costs(self, NS: int, C: int, item: int) -> acc.Costs:
        """Explicit rows ``[NC, O]`` only (``O`` parameters: always cheapest)."""
        P, O = self.xhat.shape[1:]
        return {
            LayerTreatment.LOCAL_EXPLICIT: (acc.explicit_cost(NS * C, P, O, O), 0.0)
        }

    def add_kronecker(self, gram: Tensor, g: Tensor) -> None:
        """Never chosen (see :meth:`costs`)."""
        raise NotImplementedError("elementwise parameters take explicit rows")

    def explicit(
        self, g: Tensor, budget: int, complete: bool = False
    ) -> Iterator[Chunk]:
        """One chunk: ``γ`` rows ``[NS·C, O]`` of ``g`` ``[NS, C, P, O]``."""
        NS, C, _, O = g.shape
        yield (
            slice(0, O),
            torch.einsum("ncpo,npo->nco", g, self.xhat).reshape(NS * C, O),
        )


Operand = DenseOperand | IndexOperand | ElementwiseOperand

__all__ = ["Chunk", "DenseOperand", "ElementwiseOperand", "IndexOperand", "Operand"]
