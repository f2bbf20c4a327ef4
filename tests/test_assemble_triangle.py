"""The assembly's one-triangle sums and its finiteness check on the Gram's diagonal.

``syrk`` adds into each Gram's lower triangle only (in place, no work buffer), every
other form adds a symmetric block, and the lower triangle is mirrored at the end;
non-finite factors are found on the Gram's diagonal and still named by layer.
"""

from __future__ import annotations

import pytest
import torch
from utils import report_close

from lowrank_ggn import ggn_spectrum
from lowrank_ggn.core.engine import accumulate as acc
from lowrank_ggn.core.engine.report import LayerTreatment
from lowrank_ggn.reference import dense_ggn

D = torch.float64
#: Float64 sums of float32 rows: products exact, sums to float64 round-off.
RTOL_FLOAT64_SUM = 1e-13


@pytest.mark.parametrize("chunk", [1, 3, 7, 2**22])
def test_lower_update_leaves_the_upper_triangle(monkeypatch, chunk):
    """``syrk`` in place: the lower triangle gains ``B Bᵀ``, the strict upper one is
    untouched, and :func:`mirror_lower` completes the symmetric sum."""
    monkeypatch.setattr(acc, "CAST_CHUNK", chunk)
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(6, 29, generator=gen)  # float32 rows, float64 Gram
    G0 = torch.randn(6, 6, generator=gen, dtype=D)
    G0 = G0 + G0.T
    gram = G0.clone()
    acc.lower_rank_k_update(gram, B)
    exact = G0 + B.double() @ B.double().T
    assert torch.equal(gram.triu(1), G0.triu(1))
    report_close(gram.tril(), exact.tril(), rtol=RTOL_FLOAT64_SUM, name="lower")
    acc.mirror_lower(gram)
    assert torch.equal(gram, gram.T)
    report_close(gram, exact, rtol=RTOL_FLOAT64_SUM, name="mirrored")


def test_lower_update_of_a_strided_gram_adds_the_whole_product():
    """A Gram that ``syrk`` cannot write in place (a transposed view) gets the full
    product, which is symmetric, so mirroring still gives the sum."""
    gen = torch.Generator().manual_seed(1)
    B = torch.randn(5, 8, generator=gen, dtype=D)
    base = torch.zeros(5, 5, dtype=D)
    acc.lower_rank_k_update(base.T, B)
    report_close(base, B @ B.T, rtol=RTOL_FLOAT64_SUM, name="full product")


def test_symmetric_update_keeps_an_asymmetric_start():
    """:func:`symmetric_rank_k_update` adds ``B Bᵀ`` to whatever ``gram`` holds."""
    gen = torch.Generator().manual_seed(2)
    B = torch.randn(4, 9, generator=gen, dtype=D)
    G0 = torch.randn(4, 4, generator=gen, dtype=D)  # not symmetric
    gram = G0.clone()
    acc.symmetric_rank_k_update(gram, B)
    report_close(gram, G0 + B @ B.T, rtol=RTOL_FLOAT64_SUM, name="G0 + B Bᵀ")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_balanced_passes_non_finite_sides_through(value):
    """NaN or Inf on either side: no scaling (it would fail on ``log2``), the
    products carry the value into the Gram."""
    A, g = torch.ones(2, 3, 4, dtype=D), torch.ones(2, 2, 3, 5, dtype=D)
    g[1, 0, 2, 1] = value
    found = acc.balanced(A, g, D)
    assert found is not None and found[0] is A and found[1] is g
    found = acc.balanced(g, A, D)
    assert found is not None and found[0] is g


class _Poison(torch.autograd.Function):
    """Identity whose backward pass returns ``value``: finite outputs, bad factors."""

    @staticmethod
    def forward(ctx, x, value):
        ctx.value = value
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.value, None


class _PoisonBelowHead(torch.nn.Module):
    """conv -> tanh -> poison -> flatten -> linear: the conv's factors are bad."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.head = torch.nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        if self.value != 1.0:  # 1: no poison (the dense reference needs functorch)
            h = _Poison.apply(h, self.value)
        return self.head(h.flatten(1))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize(
    "form", [LayerTreatment.KRONECKER, LayerTreatment.LOCAL_EXPLICIT]
)
def test_non_finite_factors_named_in_either_form(monkeypatch, value, form):
    """NaN or Inf in a convolution's output gradients, whichever form adds it: the
    error names the convolution, not the Gram."""
    monkeypatch.setattr(acc, "choose_form", lambda costs, budget: form)
    torch.manual_seed(0)
    model = _PoisonBelowHead(value).double()
    X, y = torch.randn(5, 2, 6, 6, dtype=D), torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match="non-finite values .* at layer 'conv'"):
        ggn_spectrum(model, torch.nn.CrossEntropyLoss(), X, y)


@pytest.mark.parametrize(
    "form", [LayerTreatment.KRONECKER, LayerTreatment.LOCAL_EXPLICIT]
)
def test_finite_factors_pass_the_diagonal_check(monkeypatch, form):
    """Finite factors in either form: the spectrum is the dense reference's."""
    monkeypatch.setattr(acc, "choose_form", lambda costs, budget: form)
    torch.manual_seed(0)
    model = _PoisonBelowHead(1.0).double()
    X, y = torch.randn(5, 2, 6, 6, dtype=D), torch.tensor([0, 1, 2, 0, 1])
    loss = torch.nn.CrossEntropyLoss()
    result = ggn_spectrum(model, loss, X, y)
    exact = torch.linalg.eigvalsh(dense_ggn(model, loss, X, y)).flip(0)
    k = result.eigenvalues.numel()
    report_close(result.eigenvalues, exact[:k], rtol=1e-10, name="eigenvalues")
