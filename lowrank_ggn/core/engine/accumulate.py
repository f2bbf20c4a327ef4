r"""Pure Gram accumulation: ``𝒢 += V_lᵀ V_l`` for one layer, from its factors.

A captured layer with input ``A_n`` ``[P, I]`` (``P`` weight-sharing positions, unfolded
for convolutions) and per-column output gradients ``g_i`` ``[P, O]`` that vanish off
sample ``n(i)`` has rows ``V_i = g_iᵀ A_{n(i)}`` ``[O·I]`` (weight) and ``Σ_p g_i``
(bias). Every function here takes those tensors and adds into ``gram`` ``[NC, NC]``
(rows sample-major, ``i = n·C + c``); none calls the model. The products that add
into ``gram`` run in ``gram``'s dtype (float64 from float32 factors by default; see
:mod:`lowrank_ggn.core.precision`).

* :func:`add_dense_linear` (``P = 1``): ``(A Aᵀ ⊗ 1_{C×C}) ⊙ (G Gᵀ)``;
  cost ``N²·I + (NC)²·O``.
* :func:`add_kron_blocks` (``P > 1``): ``𝒢_{(n,c),(m,d)} = Σ_{pq}(A_nA_mᵀ)_{pq}
  g_{ncp}·g_{mdq}``; cost ``N²·P²·I + N²·C·P·O·(P + C)``, memory ``N·C·P·O``.
* :func:`explicit_rows` (``P > 1``): ``V_i`` in output-channel chunks, each added by
  :func:`symmetric_rank_k_update`; cost ``NC·P·O·I + (NC)²·O·I``.

:func:`choose_local_form` picks the cheaper of the last two by these counts.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from lowrank_ggn.core.engine.report import LayerTreatment


def symmetric_rank_k_update(gram: Tensor, block: Tensor) -> None:
    """``gram += block @ blockᵀ`` for ``block`` ``[NC, K]``, using BLAS ``syrk`` on CPU.

    ``syrk`` computes one triangle only, half the flops of a general product; the
    result is symmetrised. On other devices this is a plain ``addmm``.

    Example:
        >>> g, b = torch.zeros(3, 3, dtype=torch.float64), torch.randn(3, 5).double()
        >>> symmetric_rank_k_update(g, b)
        >>> assert torch.allclose(g, b @ b.T)
    """
    if block.shape[1] == 0:
        return
    if block.device.type == "cpu" and block.dtype in (torch.float32, torch.float64):
        from scipy.linalg import blas

        syrk = blas.ssyrk if block.dtype == torch.float32 else blas.dsyrk
        # a C-contiguous [NC, K] array is the Fortran-ordered [K, NC] matrix Bᵀ;
        # trans=1 gives (Bᵀ)ᵀ Bᵀ = B Bᵀ without a copy
        upper = torch.from_numpy(
            syrk(1.0, np.asarray(block.detach().contiguous().numpy()).T, trans=1)
        ).triu()
        gram += upper + upper.triu(1).T
    else:
        gram.addmm_(block, block.T)


def weight_rows(g: Tensor, A: Tensor) -> Tensor:
    """``Σ_n g_{b,n}ᵀ A_n``: weight gradients ``[B, O, I]`` of ``B`` full-batch columns.

    Args:
        g: Layer-output gradients ``[B, N, P, O]`` (for convolutions the transposed
            view of autograd's ``[B, N, O, P]``, which is multiplied as it lies: no
            copy of the ``B·N·P·O`` gradients).
        A: Layer inputs ``[N, P, I]``.

    Per column one batched product ``[N, O, P] @ [N, P, I]`` and a sum over ``N``
    (a broadcast over ``B`` would copy ``A`` ``B`` times).
    """
    native = g.transpose(2, 3)  # [B, N, O, P]
    return torch.stack([torch.bmm(native[b], A).sum(0) for b in range(g.shape[0])])


def add_dense_linear(gram: Tensor, g: Tensor, A: Tensor) -> None:
    """Plain Linear (``P = 1``): ``𝒢 += (A Aᵀ ⊗ 1) ⊙ (g gᵀ)``.

    Args:
        gram: ``[NS·C, NS·C]``.
        g: Output gradients ``[NS, C, O]``.
        A: Layer inputs ``[NS, I]``.
    """
    NS, C, _ = g.shape
    A = A.to(gram.dtype)
    Ka = (A @ A.T).repeat_interleave(C, 0).repeat_interleave(C, 1)  # [NC, NC]
    flat = g.reshape(NS * C, -1).to(gram.dtype)
    gram.add_(Ka * (flat @ flat.T))


def add_kron_blocks(gram: Tensor, g: Tensor, A: Tensor) -> None:
    """``𝒢[(n,c),(m,d)] += Σ_{pq} (A_n A_mᵀ)_{pq} g_{ncp}·g_{mdq}``, blocks ``m ≥ n``.

    Per ``n``: ``K_m = A_n A_mᵀ`` ``[P, P]``, ``W_m = K_mᵀ g_n`` ``[P, O·C]`` and
    ``block_m = W_mᵀ g_m`` ``[C, C]`` (batched over ``m ≥ n``), all as matrix products
    on one contiguous ``[NS, P, O, C]`` copy of ``g``. Only the block upper triangle is
    computed; the rest follows by symmetry.

    Args:
        gram: ``[NS·C, NS·C]``.
        g: Output gradients ``[NS, C, P, O]``.
        A: Layer inputs ``[NS, P, I]``.
    """
    NS, C, P, O = g.shape
    upper = torch.zeros_like(gram)
    A = A.to(gram.dtype)
    g_poc = g.permute(0, 2, 3, 1).to(  # [NS, P, O, C], one copy
        dtype=gram.dtype, memory_format=torch.contiguous_format
    )
    for n in range(NS):
        M = NS - n  # samples m = n, …, NS − 1
        # Kt[m, q, p] = (A_n A_mᵀ)[p, q]
        Kt = (A[n:].reshape(M * P, -1) @ A[n].T).reshape(M, P, P)
        W = torch.matmul(Kt, g_poc[n].reshape(P, O * C))  # [M, P_q, O·C]
        # block[m, c, d] = Σ_{q,o} W[m, q, o, c] g[m, d, q, o]
        block = torch.bmm(
            W.reshape(M, P * O, C).transpose(1, 2), g_poc[n:].reshape(M, P * O, C)
        )
        upper[n * C : (n + 1) * C, n * C :] = block.transpose(0, 1).reshape(C, M * C)
    # mirror the strictly upper blocks; diagonal blocks are complete
    strict = upper.clone()
    for n in range(NS):
        strict[n * C : (n + 1) * C, n * C : (n + 1) * C] = 0
    gram += upper + strict.T


def explicit_rows(g: Tensor, A: Tensor, budget: int) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(channels, V[:, channels·I])``: explicit weight rows in channel chunks.

    Args:
        g: Output gradients ``[NS, C, P, O]``.
        A: Layer inputs ``[NS, P, I]``.
        budget: Bytes one chunk may take (at least one output channel per chunk).

    Yields:
        A slice of output channels ``o`` and the rows ``V_i = g_iᵀ A_{n(i)}``
        restricted to them, ``[NS·C, |o|·I]`` (weight layout ``[O, I]`` flattened).
    """
    NS, C, P, O = g.shape
    I = A.shape[-1]
    per_channel = NS * C * I * g.element_size()
    step = max(1, min(O, budget // max(1, 4 * per_channel)))
    gt = g.permute(0, 1, 3, 2)  # [NS, C, O, P]
    for o in range(0, O, step):
        part = gt[:, :, o : o + step].reshape(NS, -1, P)  # [NS, C·o, P]
        yield slice(o, min(O, o + step)), torch.bmm(part, A).reshape(NS * C, -1)


def choose_local_form(
    NS: int, C: int, P: int, O: int, I: int, itemsize: int, budget: int
) -> LayerTreatment:
    """Kronecker sample blocks or explicit rows for a weight-sharing layer, by cost."""
    NC = NS * C
    explicit_cost = NC * P * O * I + NC * NC * O * I / 2
    kron_cost = NS * NS * P * P * I + NS * NS * C * P * O * (P + C)
    kron_memory = (NS * P * P + NS * C * P * O) * itemsize
    if kron_cost < explicit_cost and kron_memory <= budget:
        return LayerTreatment.KRONECKER
    return LayerTreatment.LOCAL_EXPLICIT


__all__ = [
    "weight_rows",
    "add_dense_linear",
    "add_kron_blocks",
    "choose_local_form",
    "explicit_rows",
    "symmetric_rank_k_update",
]
