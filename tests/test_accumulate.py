"""Gram accumulation (lowrank_ggn.core.engine.accumulate): chunks and tiles change
the order of the sums, never what is summed, nor the dtype the sums run in."""

from __future__ import annotations

import pytest
import torch
from utils import report_close

from lowrank_ggn.core.engine import accumulate as acc

D = torch.float64
#: Float64 sums of float32 rows: products exact, sums to float64 round-off (float32
#: sums of these 23 terms miss by about 1e-7).
RTOL_FLOAT64_SUM = 1e-13


@pytest.mark.parametrize("chunk", [1, 3, 7, 2**21])
def test_float32_rows_are_summed_in_float64_chunk_by_chunk(monkeypatch, chunk):
    """Float32 rows into a float64 Gram: cast in column chunks (of ``chunk // NC``
    columns, at least one), every chunk's ``syrk`` added to the same triangle."""
    monkeypatch.setattr(acc, "CAST_CHUNK", chunk)
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(5, 23, generator=gen)  # float32
    G0 = torch.randn(5, 5, generator=gen, dtype=D)
    G0 = G0 + G0.T
    gram = G0.clone()
    acc.symmetric_rank_k_update(gram, B)
    exact = G0 + B.double() @ B.double().T  # float32 products are exact in float64
    report_close(gram, exact, rtol=RTOL_FLOAT64_SUM, name="float64 sums")
    assert torch.equal(gram, gram.T)


@pytest.mark.parametrize("kernel_bytes", [1, 3 * 4 * 4 * 8 * 5 * 2, 2**30])
@pytest.mark.parametrize("tile_bytes", [1, 4 * 5 * 2 * 8 * 3, 2**30])
def test_kron_tiles_equal_explicit_rows(monkeypatch, kernel_bytes, tile_bytes):
    """Tiles of kernels (several ``n`` per GEMM) and of ``W`` (several ``m``) give the
    Kronecker blocks ``Σ_{pq} k_{pq} g_{ncp}·g_{mdq}`` of every sample pair."""
    monkeypatch.setattr(acc, "KERNEL_TILE_BYTES", kernel_bytes)
    monkeypatch.setattr(acc, "KRON_TILE_BYTES", tile_bytes)
    gen = torch.Generator().manual_seed(2)
    NS, C, P, O, I = 7, 2, 4, 5, 3  # 7 samples: tiles that do not divide NS
    g = torch.randn(NS, C, P, O, generator=gen, dtype=D)
    A = torch.randn(NS, P, I, generator=gen, dtype=D)
    V = torch.einsum("ncpo,npi->ncoi", g, A).reshape(NS * C, -1)
    gram = torch.zeros(NS * C, NS * C, dtype=D)
    acc.add_kron_blocks(gram, g, acc.input_kernel(A, D))
    report_close(gram, V @ V.T, name="Kronecker blocks")


@pytest.mark.parametrize("kernel_bytes", [1, 2**30])
def test_input_kernel_in_order(monkeypatch, kernel_bytes):
    """``kernel(n)`` ``[NS − n, P, P]``, ``Kt[m, q, p] = (A_n A_{n+m}ᵀ)[p, q]``."""
    monkeypatch.setattr(acc, "KERNEL_TILE_BYTES", kernel_bytes)
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(5, 3, 4, generator=gen, dtype=D)
    kernel = acc.input_kernel(A, D)
    for n in range(5):
        expected = torch.einsum("pi,mqi->mqp", A[n], A[n:])
        report_close(kernel(n), expected, name=f"kernel({n})")
