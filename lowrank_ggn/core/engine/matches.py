r"""An embedding's Gram from its token matches: work in the matches, not in ``P²``.

An embedding ``W`` ``[V, E]`` read at tokens ``idx_{npl}`` with coefficients
``a_{npl}`` (:class:`~lowrank_ggn.core.engine.operands.IndexOperand`) has the index
kernel ``k_{nm}[p, q] = Σ_{l,l'} a_{npl} a_{mql'} [idx_{npl} = idx_{mql'}]``, so

.. math::
    𝒢_{(n,c),(m,d)} = Σ_{(i, j):\ t_i = t_j} a_i a_j ⟨g_{n_i c p_i}, g_{n_j d p_j}⟩

over ordered pairs of *occurrences* ``i = (n_i, p_i, l_i)`` (``a_i ≠ 0``) that read the
same token ``t``. The dense Kronecker form
(:func:`~lowrank_ggn.core.engine.accumulate.kron_upper`) spends ``N²·P²·C·E`` on
kernels that are almost all zero when tokens rarely repeat (a vocabulary of 1,000,
32 positions: about one match per sample pair); here the work is ``M·C²·E`` for the
``M = Σ_t (count of t)²`` matching pairs, each a ``[C, E] @ [E, C]`` product added
into its ``C×C`` block. :func:`match_count` gives ``M`` without forming the pairs, so
the caller can compare costs first.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

#: Bytes of gathered operands and products per chunk of pairs in
#: :func:`add_token_matches`.
MATCH_CHUNK_BYTES = 2**25
#: Work space of a chunk: the gathers before their cast, the scaled copy, the products.
MATCH_WORK_BYTES = 3 * MATCH_CHUNK_BYTES


def _occurrences(idx: Tensor, coef: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(sample, position, coefficient, token)`` of each ``a ≠ 0`` read, by token."""
    NS, P, L = idx.shape
    keep = (coef != 0).reshape(-1)
    flat = torch.arange(NS * P * L, device=idx.device)[keep]
    token = idx.reshape(-1)[keep]
    token, order = torch.sort(token, stable=True)
    flat = flat[order]
    return flat // (P * L), (flat // L) % P, coef.reshape(-1)[keep][order], token


def match_count(idx: Tensor, coef: Tensor) -> int:
    """``M = Σ_t (reads of t)²``: the ordered occurrence pairs with equal tokens."""
    token = idx.reshape(-1)[(coef != 0).reshape(-1)]
    if token.numel() == 0:
        return 0
    counts = torch.unique(token, return_counts=True)[1]
    return int((counts.to(torch.int64) ** 2).sum())


def _pair_chunks(token: Tensor, step: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Ordered pairs ``(i, j)`` of positions in sorted ``token`` with equal values.

    At most ``step`` pairs at a time: pair ``k`` is the ``k``-th in the order of ``i``,
    then ``j`` (a token read very often spans several chunks).
    """
    _, counts = torch.unique_consecutive(token, return_counts=True)
    size = torch.repeat_interleave(counts, counts)  # group size of each occurrence
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    ends = torch.cumsum(size, 0)  # pairs of occurrences 0…i
    for start in range(0, int(ends[-1]), step):
        k = torch.arange(start, min(start + step, int(ends[-1])), device=token.device)
        i = torch.searchsorted(ends, k, right=True)
        yield i, first[i] + k - (ends[i] - size[i])


def add_token_matches(gram: Tensor, g: Tensor, idx: Tensor, coef: Tensor) -> None:
    """``𝒢 += Σ_{t_i = t_j} a_i a_j ⟨g_{n_i c p_i}, g_{n_j d p_j}⟩`` (module docstring).

    Products run in ``gram``'s dtype; pairs are taken in chunks of
    :data:`MATCH_CHUNK_BYTES` of gathered operands and products (with the
    temporaries of a chunk, at most :data:`MATCH_WORK_BYTES`).

    Args:
        gram: ``[NS·C, NS·C]``, sample-major.
        g: Output-side operands ``[NS, C, P, E]``.
        idx: Token indices ``[NS, P, L]``.
        coef: Their coefficients ``a`` ``[NS, P, L]`` (0: padding, not read).

    Example:
        >>> g = torch.randn(3, 2, 4, 5).double()
        >>> idx, coef = torch.randint(0, 3, (3, 4, 1)), torch.ones(3, 4, 1).double()
        >>> onehot = torch.nn.functional.one_hot(idx[..., 0], 3).double()
        >>> V = torch.einsum("npt,ncpe->ncte", onehot, g)  # rows over the 3 tokens
        >>> gram = torch.zeros(6, 6).double()
        >>> add_token_matches(gram, g, idx, coef)
        >>> assert torch.allclose(gram, V.reshape(6, -1) @ V.reshape(6, -1).T)
    """
    NS, C, _, E = g.shape
    sample, position, a, token = _occurrences(idx, coef)
    if token.numel() == 0:
        return
    a = a.to(gram.dtype)
    blocks = gram.view(NS, C, NS, C).permute(0, 2, 1, 3)  # [n, m, c, d], a view
    step = max(1, MATCH_CHUNK_BYTES // ((2 * E + C) * C * gram.element_size()))
    for ii, jj in _pair_chunks(token, step):
        left = g[sample[ii], :, position[ii]].to(gram.dtype)  # [B, C, E]
        right = g[sample[jj], :, position[jj]].to(gram.dtype)
        left = left * (a[ii] * a[jj])[:, None, None]
        block = torch.bmm(left, right.transpose(1, 2))  # [B, C, D]
        blocks.index_put_((sample[ii], sample[jj]), block, accumulate=True)


__all__ = ["MATCH_CHUNK_BYTES", "MATCH_WORK_BYTES", "add_token_matches", "match_count"]
