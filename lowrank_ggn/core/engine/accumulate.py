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
* :func:`add_kron_blocks` (``P > 1``): per sample pair ``Σ_{pq} k_{pq} g_{ncp}·g_{mdq}``;
  cost ``N²·P²·I + N²·C·P·O·(P + C)``, memory ``N·C·P·O``.
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
#: Bytes of one tile of ``W`` in :func:`kron_upper` (about a core's L2 cache).
KRON_TILE_BYTES = 2**21


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


def kron_upper(upper: Tensor, g: Tensor, kernel: Kernel) -> None:
    """Add ``Σ_{pq} k_{pq} g_{ncp}·g_{mdq}`` into the block upper triangle ``m ≥ n``.

    Per ``n``: ``W_m = Ktᵀ g_n`` ``[P, O·C]`` and ``block_m = W_mᵀ g_m`` ``[C, C]``
    (batched over ``m ≥ n``), all as matrix products on one contiguous ``[NS, P, O,
    C]`` copy of ``g``. The ``m`` are taken in tiles whose ``W`` fits in
    :data:`KRON_TILE_BYTES`, so that ``W`` is still in cache when ``block`` reads it
    (both products read ``P·O·C`` entries per sample pair for ``C²`` or ``P·C``
    multiply-adds per entry: memory-bound for the whole ``m`` range at once).
    :func:`mirror_blocks` completes the matrix.

    Args:
        upper: ``[NS·C, NS·C]`` buffer (the Gram's dtype).
        g: Output-side operands ``[NS, C, P, O]``.
        kernel: See :data:`Kernel`.
    """
    NS, C, P, O = g.shape
    g_poc = g.permute(0, 2, 3, 1).to(  # [NS, P, O, C], one copy
        dtype=upper.dtype, memory_format=torch.contiguous_format
    )
    tile = max(1, KRON_TILE_BYTES // (P * O * C * upper.element_size()))
    for n in range(NS):
        Kt = kernel(n)  # [NS − n, P_q, P_p]
        gn = g_poc[n].reshape(P, O * C)
        for m0 in range(n, NS, tile):  # samples m = m0, …, m1 − 1
            m1 = min(NS, m0 + tile)
            M = m1 - m0
            W = torch.matmul(Kt[m0 - n : m1 - n], gn)  # [M, P_q, O·C]
            # block[m, c, d] = Σ_{q,o} W[m, q, o, c] g[m, d, q, o]
            block = torch.bmm(
                W.reshape(M, P * O, C).transpose(1, 2),
                g_poc[m0:m1].reshape(M, P * O, C),
            )
            rows = upper[n * C : (n + 1) * C, m0 * C : m1 * C]
            rows += block.transpose(0, 1).reshape(C, M * C)


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
    flops = kernel_flops + NS * NS * C * P * O * (P + C)
    # kernels of one n (or a tile of KERNEL_TILE_BYTES), the copy of g, W
    return flops, (NS * P * P + 2 * NS * C * P * O) * item + KERNEL_TILE_BYTES


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
    "symmetric_rank_k_update",
]
