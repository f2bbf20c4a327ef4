"""An embedding's Gram from its token matches (lowrank_ggn.core.engine.matches).

The matches form must equal ``V Vᵀ`` of the embedding's explicit rows (float64), with
padding, bags, chunks that split a token's pairs and a NaN carried to the diagonal;
the engine must pick it where tokens rarely repeat and stay exact against the dense GGN.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from utils import assert_state_equal, report_close, state_of

import lowrank_ggn.core.engine.matches as matches
from lowrank_ggn import ggn_spectrum
from lowrank_ggn.core.engine import LayerTreatment
from lowrank_ggn.reference import dense_ggn

D = torch.float64


def _rows(g, idx, coef, V):
    """Explicit rows ``[NS·C, V·E]``: ``Σ_{p,l} a_{npl} e_{idx_{npl}} ⊗ g_{ncp}``."""
    NS, C = g.shape[:2]
    onehot = torch.nn.functional.one_hot(idx, V).to(D) * coef[..., None]
    return torch.einsum("nplt,ncpe->ncte", onehot, g).reshape(NS * C, -1)


@pytest.mark.parametrize(
    "NS, C, P, L, V, E, pairs_per_chunk",
    [
        (5, 3, 6, 1, 4, 7, 1),  # every chunk one occurrence's pairs
        (5, 3, 6, 2, 3, 2, 5),  # bags of two reads per position
        (1, 1, 3, 1, 2, 2, 100),  # one sample
        (6, 2, 5, 1, 1, 3, 7),  # one token everywhere: all pairs match
        (4, 2, 7, 1, 50, 3, 1000),  # rare repeats
    ],
)
def test_matches_equal_the_explicit_rows(
    NS, C, P, L, V, E, pairs_per_chunk, monkeypatch
):
    gen = torch.Generator().manual_seed(NS * 7 + V)
    g = torch.randn(NS, C, P, E, generator=gen, dtype=D)
    idx = torch.randint(0, V, (NS, P, L), generator=gen)
    coef = torch.randn(NS, P, L, generator=gen, dtype=D)
    coef[0, 0, 0] = 0.0  # padding: not read
    chunk = pairs_per_chunk * (2 * E + C) * C * 8
    monkeypatch.setattr(matches, "MATCH_CHUNK_BYTES", chunk)
    gram = torch.zeros(NS * C, NS * C, dtype=D)
    matches.add_token_matches(gram, g, idx, coef)
    rows = _rows(g, idx, coef, V)
    torch.testing.assert_close(gram, rows @ rows.T, rtol=1e-12, atol=1e-12)
    read = idx[coef != 0]
    expected = sum(int((read == t).sum()) ** 2 for t in read.unique())
    assert matches.match_count(idx, coef) == expected


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_pair_chunks_are_bounded_and_cover_every_pair_once(step):
    token = torch.tensor([0, 0, 0, 0, 0, 2, 5, 5, 9])  # one token read five times
    seen = []
    for i, j in matches._pair_chunks(token, step):
        assert i.numel() <= step  # a chunk never exceeds its bound
        seen += list(zip(i.tolist(), j.tolist()))
    expected = [(a, b) for a in range(9) for b in range(9) if token[a] == token[b]]
    assert sorted(seen) == expected and len(seen) == len(set(seen))


def test_a_nan_operand_reaches_the_diagonal():
    g = torch.randn(3, 2, 4, 5, dtype=D)
    g[1, 0, 2, 3] = float("nan")
    idx = torch.randint(0, 20, (3, 4, 1))
    gram = torch.zeros(6, 6, dtype=D)
    matches.add_token_matches(gram, g, idx, torch.ones(3, 4, 1, dtype=D))
    assert gram[2, 2].isnan()


class Tokens(nn.Module):
    """A large vocabulary read at 8 positions (padding 0), a tanh, a linear head."""

    def __init__(self, V: int = 300) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, 4, padding_idx=0)
        self.head = nn.Linear(4 * 8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)).flatten(1))


def test_engine_takes_the_matches_and_stays_exact(monkeypatch):
    torch.manual_seed(0)
    model = Tokens().to(D)
    gen = torch.Generator().manual_seed(1)
    X = torch.randint(0, 300, (6, 8), generator=gen)
    X[0, :3] = 0  # padding
    X[1, :4] = X[2, :4]  # repeated tokens across samples
    y = torch.randint(0, 3, (6,), generator=gen)
    calls = []
    original = matches.add_token_matches

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr("lowrank_ggn.core.engine.operands.add_token_matches", counted)
    before = state_of(model)
    res = ggn_spectrum(model, nn.CrossEntropyLoss(), X, y)
    assert_state_equal(before, model)
    assert res.engine_report.layers["embed"] is LayerTreatment.KRONECKER
    assert calls and res.engine_report.fallback is None
    G = dense_ggn(model, nn.CrossEntropyLoss(), X, y)
    report_close(res.eigenvalues, torch.linalg.eigvalsh(G).flip(0)[: res.rank])
