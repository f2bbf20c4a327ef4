r"""Pure Gram accumulation: ``𝒢 += V_lᵀ V_l`` for one layer, from its factors.

A captured layer's weight rows are bilinear in two per-sample operands: a layer input
``A_n`` ``[P, I]`` (``P`` weight-sharing positions) and a column's output-side operand
``g_i`` ``[P, O]`` that vanishes off sample ``n(i)``; ``V_i = g_iᵀ A_{n(i)}`` (or its
transpose). Gram entries then need only the *kernel* ``k_{nm} = A_n A_mᵀ`` ``[P, P]``
(for an embedding, index matches ``[idx_{np} = idx_{mq}]``):

.. math::
    𝒢_{(n,c),(m,d)} = Σ_{p,q} (k_{nm})_{pq}\, ⟨g_{ncp}, g_{mdq}⟩ .

Every function here adds into ``gram`` ``[NC, NC]`` (rows sample-major, ``i = n·C +
c``); none calls the model. The products run in ``gram``'s dtype (float64 from float32
factors by default; see :mod:`lowrank_ggn.core.precision`).

* :func:`add_kernel_product` (``P = 1``): ``(k ⊗ 1_{C×C}) ⊙ (g gᵀ)``; cost
  ``N²·I + (NC)²·O``.
* :func:`add_kron_blocks` (``P > 1``): per sample pair ``Σ_{pq} k_{pq} g_{ncp}·g_{mdq}``
  (:func:`kron_upper`), in one of two orders. *Pairs*: ``W = g_n k_{nm}`` then ``⟨W,
  g_m⟩``, cost ``N²·P²·I + N²·C·P·O·(P + C)``; *rows*: all inner products ``H = G Gᵀ``
  of the rows ``g_{ncp}`` (one GEMM with inner dimension ``O``) then ``Σ_{pq} k_{pq}
  H``, cost ``N²·P²·I + N²·C²·P²·O``, taken for few positions (:func:`rows_form`).
* explicit rows (:mod:`~lowrank_ggn.core.engine.operands`), each chunk added by
  :func:`symmetric_rank_k_update`; cost ``NC·P·D_l + (NC)²·D_l / 2``.

:func:`choose_form` picks the cheapest form that fits the memory budget from the
counts an operand reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from lowrank_ggn.core.engine.report import LayerTreatment

#: ``kernel(n)`` -> ``Kt`` ``[NS − n, P, P]`` with ``Kt[m, q, p] = k(x_{n,p}, x_{n+m,q})``.
Kernel = Callable[[int], Tensor]

#: Per form: ``(flops, bytes of work space)``.
Costs = dict[LayerTreatment, tuple[float, float]]

#: Entries of a block cast at a time by :func:`lower_rank_k_update` (32 MiB in
#: float64: ``[1280, 3276]`` for ``N·C = 1280``). Measured (2 threads, 2-core EPYC,
#: float32 rows into a float64 Gram, min of 3): ``[1280, 60256]`` 1.23–1.37 s at
#: ``2**22`` against 1.37–1.49 s at ``2**21``, 1.36–1.51 s at ``2**23``;
#: ``[640, 36864]`` 0.26–0.31 s against 0.29–0.35 s and 0.32–0.33 s.
CAST_CHUNK = 2**22
#: Bytes of one tile of kernels in :func:`input_kernel`.
KERNEL_TILE_BYTES = 2**22
#: Tiles of samples at least in :func:`input_kernel`: each computes its rows against
#: the later samples, so the products below the diagonal (of the tiles themselves,
#: unused) are ``1/8`` of all with 4 tiles, ``1/2`` with one tile.
KERNEL_TILES = 4
#: Bytes of ``W`` for one tile of samples ``n`` in the pairs order of
#: :func:`kron_upper`. Measured (2 threads, 2-core EPYC, ``N = 64, C = 10``, min of
#: 4): ``P = 16, O = 128`` tiles of 8 / 16 / 32 samples 0.051 / 0.048 / 0.046 s in
#: float32, 0.111 / 0.108 / 0.106 s in float64; ``N = 128, P = 64, O = 128`` float64
#: 2 / 4 / 8 samples 4.8 / 2.8 / 2.7 s.
KRON_TILE_BYTES = 2**22
#: Bytes of the kernels held for one tile of samples in :func:`kron_upper` (at least
#: one sample's ``[N, P, P]``).
KRON_KERNEL_BYTES = 2**25
#: Bytes of one tile of inner products ``H`` in the rows order of :func:`kron_upper`.
#: Measured as above, ``P = 4, O = 256``, strips of 1 / 2 / 4 / 8 samples against all
#: later ones: 0.024 / 0.021 / 0.020 / 0.021 s in float32.
INNER_TILE_BYTES = 2**22
#: :func:`rows_form` takes the rows order while its multiply-adds are at most this
#: many times those of the pairs order: its one GEMM runs about this much faster
#: than the pairs order's small products (see :func:`kron_upper`).
ROWS_SPEEDUP = 3


def symmetric_rank_k_update(gram: Tensor, block: Tensor) -> None:
    """``gram += block @ blockᵀ`` for ``block`` ``[NC, K]``, using BLAS ``syrk`` on CPU.

    ``syrk`` computes one triangle only, half the flops of a general product
    (:func:`lower_rank_k_update` into a zero buffer); the result is symmetrised. On
    other devices this is a plain ``addmm``.

    Example:
        >>> g, b = torch.zeros(3, 3, dtype=torch.float64), torch.randn(3, 5).double()
        >>> symmetric_rank_k_update(g, b)
        >>> assert torch.allclose(g, b @ b.T)
    """
    if block.shape[1] == 0:
        return
    if not _syrk_applies(gram, block):
        lower_rank_k_update(gram, block)  # a full product there
        return
    lower = torch.zeros_like(gram)
    lower_rank_k_update(lower, block)
    gram += lower
    gram += lower.tril(-1).T


def lower_rank_k_update(gram: Tensor, block: Tensor) -> None:
    """``gram += block @ blockᵀ`` in the lower triangle (diagonal included) at least.

    On CPU (float32 or float64 ``gram``, C-contiguous) BLAS ``syrk`` adds into
    ``gram``'s lower triangle in place and leaves its strict upper triangle as it
    was: half the flops of a general product, no work buffer. Elsewhere the whole
    product is added. Either way :func:`mirror_lower` then gives ``gram`` plus the
    full ``block blockᵀ``, if every other addition to ``gram`` was symmetric.

    A ``block`` of another dtype than ``gram`` (float32 rows of a float64 Gram) is
    cast in column chunks of :data:`CAST_CHUNK` entries, each added to the same
    triangle (``syrk`` with ``β = 1``): the products and sums run in ``gram``'s
    dtype, with no full copy of the rows in it (the chunks stay in cache between the
    cast and the product).

    Example:
        >>> g, b = torch.zeros(3, 3, dtype=torch.float64), torch.randn(3, 5).double()
        >>> lower_rank_k_update(g, b)
        >>> mirror_lower(g)
        >>> assert torch.allclose(g, b @ b.T)
    """
    if block.shape[1] == 0:
        return
    chunks = _cast_chunks(block.detach(), gram.dtype)
    if not _syrk_applies(gram, block):
        for part in chunks:
            gram.addmm_(part, part.T)
        return
    from scipy.linalg import blas

    syrk = blas.ssyrk if gram.dtype == torch.float32 else blas.dsyrk
    # gram's C-ordered buffer read as a Fortran-ordered array is gramᵀ: syrk's upper
    # triangle there is gram's lower triangle, updated in place (overwrite_c)
    c = gram.numpy().T
    for part in chunks:
        # a C-contiguous [NC, k] array is the Fortran-ordered [k, NC] matrix Bᵀ;
        # trans=1 gives (Bᵀ)ᵀ Bᵀ = B Bᵀ without a copy
        a = np.asarray(part.numpy()).T
        out = syrk(1.0, a, trans=1, beta=1.0, c=c, overwrite_c=1)
        if not np.shares_memory(out, c):  # never seen: a copy was returned
            c[...] = out


def mirror_lower(gram: Tensor) -> None:
    """Make ``gram`` symmetric from its lower triangle, in place (upper := lowerᵀ)."""
    strict = gram.tril(-1)
    gram.tril_()
    gram += strict.T


def _syrk_applies(gram: Tensor, block: Tensor) -> bool:
    """Whether :func:`lower_rank_k_update` runs ``syrk`` in place on ``gram``."""
    return (
        block.device.type == "cpu"
        and gram.dtype in (torch.float32, torch.float64)
        and gram.is_contiguous()
        and not gram.requires_grad
    )


def _cast_chunks(block: Tensor, dtype: torch.dtype) -> Iterator[Tensor]:
    """``block`` ``[NC, K]`` as contiguous column chunks in ``dtype``, one at a time.

    ``block`` itself (made contiguous) if it has that dtype. Every chunk is written
    into the same buffer: each is valid until the next one is taken.
    """
    if block.dtype == dtype:
        yield block.contiguous()
        return
    NC, K = block.shape
    step = max(1, CAST_CHUNK // max(1, NC))
    # one buffer for every chunk: no fresh pages (and their faults) per chunk
    buffer = block.new_empty(NC * min(step, K), dtype=dtype)
    for k in range(0, K, step):
        part = block[:, k : k + step]
        yield buffer[: part.numel()].view(part.shape).copy_(part)


def balanced(A: Tensor, g: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
    """Scale before squaring: ``(A·s, g/s)`` for a power of two ``s`` where needed.

    A Kronecker block multiplies ``A Aᵀ`` by ``g gᵀ``; each square can overflow (or
    underflow) ``dtype`` where the rows ``g ⊗ a`` and the Gram do not (inputs of
    1e200 into a saturated ``tanh``: ``∞ · 0``). The rows are unchanged by
    ``A → A·s, g → g/s``; ``s`` evens the two sides' largest magnitudes, and only
    when a side's square would come within ``2^16`` of ``dtype``'s range (else ``A, g``
    unchanged, no copy). ``None`` when a side is all zero (the block vanishes);
    ``A, g`` unchanged when either holds NaN or Inf.
    """
    a, b = A.abs().amax().item(), g.abs().amax().item()
    if not (math.isfinite(a) and math.isfinite(b)):
        return A, g  # NaN/Inf: the products carry it into the Gram's diagonal
    if a == 0.0 or b == 0.0:
        return None
    fin = torch.finfo(dtype)  # safe range for squares: half the exponent range
    hi, lo = math.sqrt(fin.max) / 256, math.sqrt(fin.tiny) * 256
    if lo < a < hi and lo < b < hi:
        return A, g
    e = round((math.log2(a) - math.log2(b)) / 2)
    return torch.ldexp(A, A.new_tensor(-e)), torch.ldexp(g, g.new_tensor(e))


def input_kernel(A: Tensor, dtype: torch.dtype) -> Kernel:
    """The kernel ``A_n A_mᵀ`` of layer inputs ``A`` ``[NS, P, I]``.

    Kernels are computed for several ``n`` at once, one GEMM ``[t·P, I] @ [I, (NS −
    n)·P]`` per tile of ``t`` samples with at most :data:`KERNEL_TILE_BYTES` of
    output (a GEMM with ``P`` output columns per ``n`` runs far from peak); ``kernel``
    is called with ``n = 0, 1, …`` in order, as :func:`kron_upper` does.
    """
    A = A.to(dtype)
    NS, P = A.shape[:2]
    flat = A.reshape(NS * P, -1)
    tile = max(1, KERNEL_TILE_BYTES // (NS * P * P * A.element_size()))
    tile = min(tile, -(-NS // KERNEL_TILES))
    cache: dict[int, Tensor] = {}  # first sample of the tile -> its kernels

    def kernel(n: int) -> Tensor:
        n0 = n - n % tile
        if n0 not in cache:
            cache.clear()
            n1 = min(NS, n0 + tile)
            # rows (n', p) of the tile against columns (m, q) for m ≥ n0
            cache[n0] = flat[n0 * P : n1 * P] @ flat[n0 * P :].T
        rows = cache[n0][(n - n0) * P : (n - n0 + 1) * P, (n - n0) * P :]
        # Kt[m, q, p] = (A_n A_mᵀ)[p, q]
        return rows.reshape(P, NS - n, P).permute(1, 2, 0).contiguous()

    return kernel


def add_kernel_product(gram: Tensor, g: Tensor, K: Tensor) -> None:
    """One position (``P = 1``): ``𝒢 += (K ⊗ 1_{C×C}) ⊙ (g gᵀ)``.

    Args:
        gram: ``[NS·C, NS·C]``.
        g: Output-side operands ``[NS, C, O]``.
        K: Kernel ``[NS, NS]`` (``A Aᵀ`` for inputs ``A`` ``[NS, I]``).
    """
    NS, C, _ = g.shape
    Ka = K.to(gram.dtype).repeat_interleave(C, 0).repeat_interleave(C, 1)  # [NC, NC]
    flat = g.reshape(NS * C, -1).to(gram.dtype)
    gram.add_(Ka * (flat @ flat.T))


def rows_form(C: int, P: int) -> bool:
    """Whether :func:`kron_upper` takes the rows order: ``C·P ≤ ROWS_SPEEDUP·(C + P)``.

    The rows order costs ``C·P / (C + P)`` times the multiply-adds of the pairs order
    per sample pair (``C²·P²·O`` against ``C·P·O·(P + C)``); :data:`ROWS_SPEEDUP` is
    how much faster its GEMM runs. With ``C = 10``: ``P ≤ 4``.
    """
    return C * P <= ROWS_SPEEDUP * (C + P)


def kron_upper(upper: Tensor, g: Tensor, kernel: Kernel) -> None:
    r"""Add ``Σ_{pq} k_{pq} g_{ncp}·g_{mdq}`` into the block upper triangle ``m ≥ n``.

    Samples are taken in tiles of ``n``; each tile's kernels ``k_{nm}``, ``m ≥ n``,
    are gathered once. Two orders of the sums, by :func:`rows_form`:

    * *pairs* (:func:`_kron_pairs`): per ``m``, ``W_n = g_n k_{nm}`` ``[C·O, P]`` for
      every ``n ≤ m`` of the tile (one batched product, inner dimension ``P``), then
      ``[W_n]_n`` ``[t·C, O·P]`` times ``g_mᵀ`` ``[O·P, C]`` (one product, added
      straight into the Gram's rows).
    * *rows* (:func:`_kron_rows`): per pair of tiles, ``H = G_n G_mᵀ`` over the rows
      ``(n, c, p)`` of ``g`` (one GEMM, inner dimension ``O``), ``H ⊙ k``, summed
      over ``p, q``.

    Measured against the previous version (one ``n`` at a time, ``C×C`` products per
    pair; 2 threads, 2-core AMD EPYC, min of 5, ``N = 64, C = 10``, float32 /
    float64 Gram): ``P = 16, O = 128, I = 1152`` (pairs) 0.042 / 0.097 s against
    0.121 / 0.107 s; ``P = 4, O = 256, I = 2304`` (rows) 0.021 / 0.032 s against
    0.049 / 0.038 s (pairs 0.034 / 0.043 s); ``P = 2`` (rows) 0.011 / 0.016 s against
    0.026 / 0.018 s; ``P = 8, O = 128`` (pairs) 0.034 / 0.046 s against 0.053 / 0.045
    s; ``P = 64, O = 64, I = 576`` 0.19 / 0.36 s against 0.30 / 0.38 s; ``N = 128,
    P = 36, O = 128, I = 864`` 0.49 / 0.92 s against 1.14 / 1.23 s. Float64 gains
    less: its small products ran at half the float64 GEMM rate already.
    :func:`mirror_blocks` completes the matrix.

    Args:
        upper: ``[NS·C, NS·C]`` buffer (the Gram's dtype).
        g: Output-side operands ``[NS, C, P, O]``.
        kernel: See :data:`Kernel`.
    """
    C, P = g.shape[1:3]
    if rows_form(C, P):
        _kron_rows(upper, g, kernel)
    else:
        _kron_pairs(upper, g, kernel)


def pairs_tile(NS: int, C: int, P: int, O: int, item: int) -> int:
    """Samples per tile of the pairs order (at least one).

    ``W`` within :data:`KRON_TILE_BYTES`, kernels within :data:`KRON_KERNEL_BYTES`.
    """
    by_w = KRON_TILE_BYTES // (C * O * P * item)
    by_kernel = KRON_KERNEL_BYTES // (NS * P * P * item)
    return max(1, min(NS, by_w, by_kernel))


def rows_tile(NS: int, C: int, P: int, item: int) -> tuple[int, int]:
    """Samples ``(t, M)`` per tile of the rows order: ``H`` ``[t·C·P, M·C·P]``.

    Strips of ``t`` samples against all later ones where ``H`` fits in
    :data:`INNER_TILE_BYTES` (few unused blocks below the diagonal, a wide GEMM),
    else narrower; at least ``1 × 1``. The strip's kernels are held too: ``t`` within
    :data:`KRON_KERNEL_BYTES`.
    """
    per_pair = (C * P) ** 2 * item
    t = max(1, min(NS, INNER_TILE_BYTES // (NS * per_pair)))
    t = max(1, min(t, KRON_KERNEL_BYTES // (NS * P * P * item)))
    return t, max(t, min(NS, INNER_TILE_BYTES // (t * per_pair)))


def _kernel_tile(
    kernel: Kernel, n0: int, n1: int, NS: int, dtype: torch.dtype
) -> Tensor:
    """The kernels of samples ``n0 ≤ n < n1``: ``K`` ``[NS − n0, n1 − n0, P, P]``.

    ``K[m − n0, n − n0, q, p] = (k_{nm})_{pq}`` for ``m ≥ n``, zero for ``m < n``;
    ``kernel`` is called for ``n = n0, …, n1 − 1`` in order.
    """
    K = None
    for n in range(n0, n1):
        Kt = kernel(n)  # [NS − n, P_q, P_p]
        if K is None:
            K = Kt.new_zeros((NS - n0, n1 - n0) + Kt.shape[1:], dtype=dtype)
        K[n - n0 :, n - n0] = Kt
    return K


def _dense(x: Tensor, dtype: torch.dtype) -> Tensor:
    """A C-contiguous copy of ``x`` in ``dtype`` (one copy, whatever ``x``'s strides)."""
    return torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x)


def _kron_pairs(upper: Tensor, g: Tensor, kernel: Kernel) -> None:
    """The pairs order of :func:`kron_upper`."""
    NS, C, P, O = g.shape
    dtype = upper.dtype
    # g[n, c, o, p]: rows (c, o) of W_n = g_n k_nm; the same layout gives g_m's
    # columns (o, q) for the second product
    gt = _dense(g.transpose(2, 3), dtype).view(NS, C * O, P)
    T = pairs_tile(NS, C, P, O, upper.element_size())
    W = gt.new_empty(T, C * O, P)  # reused by every product: no fresh pages
    for n0 in range(0, NS, T):
        n1 = min(NS, n0 + T)
        K = _kernel_tile(kernel, n0, n1, NS, dtype)  # [NS − n0, t, P_q, P_p]
        for m in range(n0, NS):
            t = min(n1, m + 1) - n0  # the tile's samples n ≤ m
            # W[n, (c, o), q] = Σ_p g[n, c, p, o] k_nm[p, q]
            Wm = torch.bmm(gt[n0 : n0 + t], K[m - n0, :t].transpose(1, 2), out=W[:t])
            # 𝒢[(n, c), (m, d)] += Σ_{o,q} W[n, c, o, q] g[m, d, q, o]
            rows = upper[n0 * C : (n0 + t) * C, m * C : (m + 1) * C]
            rows.addmm_(Wm.view(t * C, O * P), gt[m].view(C, O * P).T)


def _kron_rows(upper: Tensor, g: Tensor, kernel: Kernel) -> None:
    """The rows order of :func:`kron_upper`."""
    NS, C, P, O = g.shape
    R = C * P  # rows (c, p) per sample
    G = _dense(g, upper.dtype).view(NS * R, O)
    T, MT = rows_tile(NS, C, P, upper.element_size())
    H = G.new_empty(T * R * MT * R)  # reused by every tile
    below = torch.ones(T, MT, dtype=torch.bool, device=g.device).tril(-1)  # m < n
    for n0 in range(0, NS, T):
        n1 = min(NS, n0 + T)
        t = n1 - n0
        K = _kernel_tile(kernel, n0, n1, NS, upper.dtype)  # [NS − n0, t, P_q, P_p]
        for m0 in range(n0, NS, MT):
            m1 = min(NS, m0 + MT)
            M = m1 - m0
            # H[(n, c, p), (m, d, q)] = ⟨g_ncp, g_mdq⟩
            Hnm = H[: t * R * M * R].view(t * R, M * R)
            torch.mm(G[n0 * R : n1 * R], G[m0 * R : m1 * R].T, out=Hnm)
            Hnm = Hnm.view(t, C, P, M, C, P)
            # H[n, c, p, m, d, q] *= k_nm[p, q]  (K[m, n, q, p] -> [n, 1, p, m, 1, q])
            Hnm.mul_(K[m0 - n0 : m1 - n0].permute(1, 3, 0, 2)[:, None, :, :, None])
            blocks = Hnm.sum(dim=(2, 5))  # [t, C, M, C]
            if m0 == n0:  # the strip's first tile: blocks m < n lie below
                blocks.masked_fill_(below[:t, None, :M, None], 0)
            upper[n0 * C : n1 * C, m0 * C : m1 * C] += blocks.view(t * C, M * C)


def mirror_blocks(gram: Tensor, upper: Tensor, C: int) -> None:
    """``gram += upper + (strictly upper blocks of upper)ᵀ`` (``C×C`` diagonal blocks)."""
    strict = upper.clone()
    for n in range(0, upper.shape[0], C):
        strict[n : n + C, n : n + C] = 0
    gram += upper + strict.T


def add_kron_blocks(gram: Tensor, g: Tensor, kernel: Kernel) -> None:
    """``𝒢[(n,c),(m,d)] += Σ_{pq} k_{pq} g_{ncp}·g_{mdq}`` (see :func:`kron_upper`).

    Args:
        gram: ``[NS·C, NS·C]``.
        g: Output-side operands ``[NS, C, P, O]``.
        kernel: See :data:`Kernel`, e.g. :func:`input_kernel`.

    Example:
        >>> g, A = torch.randn(3, 2, 4, 5).double(), torch.randn(3, 4, 6).double()
        >>> V = torch.einsum("ncpo,npi->ncoi", g, A).reshape(6, -1)
        >>> gram = torch.zeros(6, 6, dtype=torch.float64)
        >>> add_kron_blocks(gram, g, input_kernel(A, torch.float64))
        >>> assert torch.allclose(gram, V @ V.T)
    """
    upper = torch.zeros_like(gram)
    kron_upper(upper, g, kernel)
    mirror_blocks(gram, upper, g.shape[1])


def kron_costs(
    NS: int, C: int, P: int, O: int, kernel_flops: float, item: int
) -> tuple[float, float]:
    """``(flops, bytes)`` of the Kronecker form for one group of ``O`` channels.

    ``kernel_flops``: the cost of all ``N²`` kernels ``[P, P]`` (``N²·P²·I`` for
    inputs ``[P, I]``, ``N²·P²`` for index matches).
    """
    if P == 1:
        return kernel_flops + (NS * C) ** 2 * O, 0.0
    pairs = NS * NS * C * P * O * (P + C)
    if rows_form(C, P):
        # the rows order's GEMM counted at ROWS_SPEEDUP times the pairs order's speed
        t, M = rows_tile(NS, C, P, item)
        flops = kernel_flops + min(pairs, NS * NS * (C * P) ** 2 * O / ROWS_SPEEDUP)
        work = t * M * (C * P) ** 2
    else:
        t = pairs_tile(NS, C, P, O, item)
        flops, work = kernel_flops + pairs, t * C * O * P
    # a tile's kernels, the copy of g, W or H, input_kernel's tile
    memory = (t * NS * P * P + NS * C * P * O + work) * item + KERNEL_TILE_BYTES
    return flops, memory


def explicit_cost(NC: int, P: int, width: int, D: int) -> float:
    """Flops of explicit rows: ``NC·P·width`` to form them, ``(NC)²·D/2`` for ``syrk``.

    ``width``: the multiply-adds per position and column (``D_l`` for a dense weight,
    whose rows are ``Σ_p g_p a_pᵀ``; the row width for an embedding's scatter or an
    elementwise affine).
    """
    return NC * P * width + NC * NC * D / 2


def choose_form(costs: Costs, budget: int) -> LayerTreatment:
    """The cheapest form whose work space fits ``budget`` (explicit rows always fit)."""
    fits = {f: c for f, (c, mem) in costs.items() if mem <= budget}
    if not fits:
        return LayerTreatment.LOCAL_EXPLICIT
    return min(fits, key=fits.get)


__all__ = [
    "Costs",
    "Kernel",
    "add_kernel_product",
    "add_kron_blocks",
    "choose_form",
    "explicit_cost",
    "input_kernel",
    "kron_costs",
    "kron_upper",
    "lower_rank_k_update",
    "mirror_blocks",
    "mirror_lower",
    "pairs_tile",
    "rows_form",
    "rows_tile",
    "symmetric_rank_k_update",
]
