"""Eigenvalues and eigenvectors against ``eigvalsh`` of the dense GGN, float64."""

from __future__ import annotations

import pytest
import torch
from cases import CASES, MIXING_CASES
from utils import RTOL, assert_spectrum_matches, call, report_close

from lowrank_ggn import ggn_spectrum
from lowrank_ggn.core.loss_factors import loss_hessian_factors
from lowrank_ggn.core.state import model_preserved
from lowrank_ggn.reference import dense_ggn


def test_eigenvalues_match_dense(case):
    model, loss, X, y = case.make()
    res = ggn_spectrum(model, loss, X, y)
    G = dense_ggn(model, loss, X, y)
    assert res.eigenvalues.dtype == torch.float64
    assert (res.eigenvalues[:-1] >= res.eigenvalues[1:]).all(), "not descending"
    assert (res.eigenvalues > 0).all()
    assert res.rank <= res.num_columns
    assert_spectrum_matches(res.eigenvalues, G)


def test_eigenvectors_are_orthonormal_eigenpairs(case):
    model, loss, X, y = case.make()
    res = ggn_spectrum(model, loss, X, y, eigenvectors=True)
    G = dense_ggn(model, loss, X, y)
    E, lam = res.eigenvectors, res.eigenvalues
    assert E.shape == (lam.numel(), G.shape[0])
    report_close(E @ E.T, torch.eye(lam.numel(), dtype=E.dtype), name="EᵀE")
    residual = (G @ E.T - E.T * lam).norm(dim=0)
    assert residual.max() <= RTOL * lam[0], f"‖G e − λ e‖ = {residual.max():.3e}"


def test_top_k_is_a_prefix_of_the_full_spectrum(case):
    model, loss, X, y = case.make()
    full = ggn_spectrum(model, loss, X, y)
    k = max(1, full.rank // 2)
    top = ggn_spectrum(model, loss, X, y, top_k=k, eigenvectors=True)
    report_close(top.eigenvalues, full.eigenvalues[:k], name="top_k")
    assert top.eigenvectors.shape[0] == k


def test_path_is_chosen_from_structure(case):
    model, loss, X, y = case.make()
    res = ggn_spectrum(model, loss, X, y, top_k=1)
    assert res.path.name == ("full_batch" if case.mixing else "per_sample"), res.path
    assert res.path.sample_mixing == case.mixing
    assert res.path.reason


BN_MLP_CASES = [c for c in MIXING_CASES if c.name.startswith("bn1d-train")]


def _vivit_style_gram(model, loss, X, y):
    """The per-sample shortcut of ViViT/BackPACK for Linear/BatchNorm1d nets.

    Backpropagate ``S[c]`` for all samples at once through the batch graph and read
    sample n's gradient off layer by layer, as if the model were sample-independent:
    ``g_n a_nᵀ`` for a Linear weight, ``g_n ⊙ x̂_n`` for a BatchNorm weight.
    """
    cache = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out: cache.__setitem__(mod, (inp[0], out))
        )
        for m in model.modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.BatchNorm1d))
    ]
    with model_preserved(model):
        try:
            out = call(model, X)
        finally:
            for h in hooks:
                h.remove()
        S = loss_hessian_factors(loss, out.detach(), y)
        mods = list(cache)
        columns = []
        for c in range(S.shape[0]):
            gs = torch.autograd.grad(
                out, [cache[m][1] for m in mods], S[c], retain_graph=True
            )
            blocks = []
            for m, g in zip(mods, gs):
                a = cache[m][0].detach()
                if isinstance(m, torch.nn.Linear):
                    blocks += [torch.einsum("no,ni->noi", g, a).flatten(1), g]
                else:
                    if m.training:
                        mean, var = a.mean(0), a.var(0, unbiased=False)
                    else:
                        mean, var = m.running_mean, m.running_var
                    xhat = (a - mean) / (var + m.eps).sqrt()
                    blocks += [g * xhat, g]
            columns.append(torch.cat(blocks, dim=1))  # [N, D]
    V = torch.stack(columns, dim=1).flatten(0, 1)  # [N·C, D], sample-major
    return V @ V.T


@pytest.mark.parametrize("case", BN_MLP_CASES, ids=[c.name for c in BN_MLP_CASES])
def test_per_sample_shortcut_is_wrong_for_train_mode_batchnorm(case):
    """ViViT's per-sample shortcut gives a wrong spectrum under train-mode BN; we don't take it."""
    model, loss, X, y = case.make()
    G = dense_ggn(model, loss, X, y)
    exact = torch.linalg.eigvalsh(G).flip(0)
    shortcut = torch.linalg.eigvalsh(_vivit_style_gram(model, loss, X, y)).flip(0)
    n = min(shortcut.numel(), exact.numel())
    err = ((shortcut[:n] - exact[:n]).abs().max() / exact[0]).item()
    assert err > 1e-2, f"shortcut agreed with the exact spectrum (rel. err {err:.1e})"
    auto = ggn_spectrum(model, loss, X, y)
    assert auto.path.name == "full_batch"
    assert_spectrum_matches(auto.eigenvalues, G)
    with pytest.raises(ValueError, match="path='per_sample' is invalid"):
        ggn_spectrum(model, loss, X, y, path="per_sample")


def test_shortcut_reference_is_exact_without_batch_statistics():
    """The same shortcut code is exact in eval mode: the test above measures BN, not a bug."""
    model, loss, X, y = next(c for c in CASES if c.name == "bn1d-eval-ce").make()
    shortcut = torch.linalg.eigvalsh(_vivit_style_gram(model, loss, X, y)).flip(0)
    exact = torch.linalg.eigvalsh(dense_ggn(model, loss, X, y)).flip(0)
    n = min(shortcut.numel(), exact.numel())
    report_close(shortcut[:n], exact[:n], name="shortcut (eval mode)")


def test_custom_mixing_module_is_detected_numerically():
    """A model that centres over the batch, without any BatchNorm module."""

    class Centre(torch.nn.Module):
        def forward(self, x):
            return x - x.mean(0, keepdim=True)

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), Centre(), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1])
    loss = torch.nn.CrossEntropyLoss()
    res = ggn_spectrum(model, loss, X, y)
    assert res.path.name == "full_batch" and res.path.sample_mixing
    assert_spectrum_matches(res.eigenvalues, dense_ggn(model, loss, X, y))


def test_zero_ggn_gives_empty_spectrum():
    model = torch.nn.Linear(2, 2).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([500.0, -500.0]))
    X = torch.randn(3, 2, dtype=torch.float64)
    res = ggn_spectrum(
        model,
        torch.nn.CrossEntropyLoss(),
        X,
        torch.zeros(3, dtype=torch.long),
        eigenvectors=True,
    )
    assert res.rank == 0 and res.eigenvectors.shape == (0, 6)


@pytest.mark.parametrize("top_k", [0, -1, 1.5, True])
def test_bad_top_k_raises(top_k):
    model, loss, X, y = CASES[0].make()
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        ggn_spectrum(model, loss, X, y, top_k=top_k)


def test_eigenvectors_of_the_top_k_only(case):
    """``eigenvectors=k``: every eigenvalue, the ``k`` leading eigenvectors."""
    model, loss, X, y = case.make()
    full = ggn_spectrum(model, loss, X, y, eigenvectors=True)
    k = min(2, full.rank)
    part = ggn_spectrum(model, loss, X, y, eigenvectors=2)
    report_close(part.eigenvalues, full.eigenvalues, name="eigenvalues")
    assert part.eigenvectors.shape == (k, full.eigenvectors.shape[1])
    # eigenvectors are unique up to sign for simple eigenvalues
    signs = (part.eigenvectors * full.eigenvectors[:k]).sum(1).sign()
    report_close(part.eigenvectors * signs[:, None], full.eigenvectors[:k], name="e_k")


@pytest.mark.parametrize("bad", [0, -2, 1.5, "3"])
def test_bad_eigenvectors_argument_raises(bad):
    model, loss, X, y = CASES[0].make()
    with pytest.raises(
        ValueError, match="eigenvectors must be True/False or a positive int"
    ):
        ggn_spectrum(model, loss, X, y, eigenvectors=bad)


class _NaNBackward(torch.autograd.Function):
    """Identity whose backward pass returns NaN: finite outputs, NaN factors below."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def test_non_finite_factors_are_named_not_a_linalg_error():
    """A NaN reaching the factors: a clear error naming the first layer."""

    class NaNBelowHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)
            self.head = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.head(_NaNBackward.apply(torch.tanh(self.fc(x))))

    torch.manual_seed(0)
    model = NaNBelowHead().double()
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match="non-finite values .* at layer 'fc'"):
        ggn_spectrum(model, torch.nn.CrossEntropyLoss(), X, y)


@pytest.mark.parametrize("conv", [False, True])
def test_large_inputs_are_scaled_before_squaring(conv):
    """Inputs of 1e200 into a saturated tanh: the rows are finite, so is the Gram.

    ``A Aᵀ`` alone overflows (1e400) while ``g gᵀ`` is 0; the layer-wise engine
    balances the two sides by a power of two and agrees with the generic engine.
    """
    torch.manual_seed(0)
    if conv:
        model = torch.nn.Sequential(
            torch.nn.Conv2d(2, 3, 3),
            torch.nn.Tanh(),
            torch.nn.Flatten(),
            torch.nn.Linear(48, 3),
        ).double()
        X = torch.randn(6, 2, 6, 6, dtype=torch.float64)
    else:
        model = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        ).double()
        X = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    loss = torch.nn.CrossEntropyLoss()
    fast = ggn_spectrum(model, loss, X * 1e200, y)
    slow = ggn_spectrum(model, loss, X * 1e200, y, engine="generic")
    assert fast.eigenvalues.isfinite().all()
    assert_spectrum_matches(fast.eigenvalues, dense_ggn(model, loss, X * 1e200, y))
    report_close(fast.eigenvalues, slow.eigenvalues, name="layer-wise vs generic")


def test_overflowing_gram_is_a_clear_error():
    """Rows of 1e200 (outputs of order 1): the Gram itself is 1e400, a clear error."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    with torch.no_grad():
        model.weight.mul_(1e-200)
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="non-finite entries"):
        ggn_spectrum(model, torch.nn.CrossEntropyLoss(), X * 1e200, y)
