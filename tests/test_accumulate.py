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


#: ``ROWS_SPEEDUP`` that forces each order of :func:`kron_upper`.
ORDERS = {"pairs": 0, "rows": 10**9}


def explicit_gram(g, A):
    """``V Vᵀ`` from the explicit rows ``V_{(n,c)} = Σ_p g_{ncp} ⊗ A_{np}``."""
    NS, C = g.shape[:2]
    V = torch.einsum("ncpo,npi->ncoi", g, A).reshape(NS * C, -1)
    return V @ V.T


def kron_gram(g, A):
    """:func:`add_kron_blocks` of ``g`` and the input kernel of ``A`` (float64)."""
    NS, C = g.shape[:2]
    gram = torch.zeros(NS * C, NS * C, dtype=D)
    acc.add_kron_blocks(gram, g, acc.input_kernel(A, D))
    return gram


def operands(NS, C, P, O, I, seed):
    """Random float64 ``g`` ``[NS, C, P, O]`` and ``A`` ``[NS, P, I]``."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(NS, C, P, O, generator=gen, dtype=D)
    return g, torch.randn(NS, P, I, generator=gen, dtype=D)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kernel_bytes", [1, 3 * 4 * 4 * 8 * 5 * 2, 2**30])
@pytest.mark.parametrize("tile_bytes", [1, 4 * 5 * 2 * 8 * 3, 2**30])
def test_kron_tiles_equal_explicit_rows(monkeypatch, order, kernel_bytes, tile_bytes):
    """Tiles of kernels (several ``n`` per GEMM) and of ``W`` or ``H`` (several ``n``
    and ``m``) give the Kronecker blocks ``Σ_{pq} k_{pq} g_{ncp}·g_{mdq}`` of every
    sample pair, in either order."""
    monkeypatch.setattr(acc, "ROWS_SPEEDUP", ORDERS[order])
    monkeypatch.setattr(acc, "KERNEL_TILE_BYTES", kernel_bytes)
    monkeypatch.setattr(acc, "KRON_KERNEL_BYTES", kernel_bytes)
    monkeypatch.setattr(acc, "KRON_TILE_BYTES", tile_bytes)
    monkeypatch.setattr(acc, "INNER_TILE_BYTES", tile_bytes)
    g, A = operands(7, 2, 4, 5, 3, seed=2)  # 7 samples: tiles that do not divide NS
    report_close(kron_gram(g, A), explicit_gram(g, A), name="Kronecker blocks")


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(
    "shape",
    [
        (5, 3, 1, 4, 2),
        (4, 1, 6, 3, 5),
        (1, 3, 4, 5, 2),
        (1, 1, 1, 1, 1),
        (9, 2, 3, 1, 4),
    ],
    ids=["P=1", "C=1", "N=1", "all-1", "O=1"],
)
def test_kron_orders_at_the_edges(monkeypatch, order, shape):
    """One position, one column, one sample, one output channel: ``V Vᵀ``."""
    monkeypatch.setattr(acc, "ROWS_SPEEDUP", ORDERS[order])
    g, A = operands(*shape, seed=4)
    report_close(kron_gram(g, A), explicit_gram(g, A), name=f"{order} {shape}")


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("tiles", [1, 2, 3, 64])
def test_kron_orders_odd_tiles(monkeypatch, order, tiles):
    """Tiles of 1, 2, 3 or all of 11 samples (strips, columns and kernels)."""
    NS, C, P, O, I = 11, 3, 5, 4, 6
    item = torch.finfo(D).bits // 8
    monkeypatch.setattr(acc, "ROWS_SPEEDUP", ORDERS[order])
    monkeypatch.setattr(acc, "KRON_TILE_BYTES", tiles * C * O * P * item)
    monkeypatch.setattr(acc, "INNER_TILE_BYTES", tiles * NS * (C * P) ** 2 * item)
    monkeypatch.setattr(acc, "KERNEL_TILE_BYTES", tiles * NS * P * P * item)
    t = min(NS, tiles)
    assert acc.pairs_tile(NS, C, P, O, item) == t
    assert acc.rows_tile(NS, C, P, item)[0] == t
    g, A = operands(NS, C, P, O, I, seed=5)
    report_close(kron_gram(g, A), explicit_gram(g, A), name=f"{order}, tiles of {t}")


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("side", ["g", "A"])
def test_kron_orders_carry_nan_to_the_diagonal(monkeypatch, order, side):
    """A NaN in one sample's factors reaches that sample's diagonal entries and stays
    in its rows and columns (the blocks below the diagonal that the rows order
    computes and drops do not carry it): the engine's diagonal check sees it."""
    monkeypatch.setattr(acc, "ROWS_SPEEDUP", ORDERS[order])
    NS, C, P, j, c = 6, 2, 3, 3, 1
    # strips of 2 samples: blocks below the diagonal in each strip's first tile
    monkeypatch.setattr(acc, "INNER_TILE_BYTES", 2 * NS * (C * P) ** 2 * 8)
    g, A = operands(NS, C, P, 4, 5, seed=6)
    exact = explicit_gram(g, A)
    if side == "g":
        g[j, c, 1, 2] = float("nan")
        bad = [j * C + c]  # one column of sample j
    else:
        A[j, 2, 0] = float("nan")
        bad = list(range(j * C, (j + 1) * C))  # every column of sample j
    gram = kron_gram(g, A)
    expected = torch.zeros_like(gram, dtype=torch.bool)
    expected[bad] = expected[:, bad] = True
    assert torch.equal(gram.isnan(), expected)
    report_close(gram[~expected], exact[~expected], name="entries without the NaN")


def test_kron_costs_count_the_rows_order_faster():
    """The rows order is priced in pairs-order units: its multiply-adds over
    ``ROWS_SPEEDUP``, never above the pairs count; memory holds its tile."""
    NS, C, P, O, item = 64, 10, 4, 256, 8
    assert acc.rows_form(C, P) and not acc.rows_form(C, 16)
    flops, memory = acc.kron_costs(NS, C, P, O, 0.0, item)
    pairs = NS * NS * C * P * O * (P + C)
    assert flops == min(pairs, NS * NS * (C * P) ** 2 * O / acc.ROWS_SPEEDUP)
    t, M = acc.rows_tile(NS, C, P, item)
    assert memory >= t * M * (C * P) ** 2 * item
    assert t * M * (C * P) ** 2 * item <= acc.INNER_TILE_BYTES


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
