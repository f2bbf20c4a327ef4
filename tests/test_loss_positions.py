"""Cross-entropy over positions (language-model losses): recognised, closed form, exact."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import zoo_patterns
from utils import RTOL, assert_state_equal, report_close, state_of

from lowrank_ggn import ggn_spectrum, loss_hessian_factors, resolve_loss
from lowrank_ggn import sampled_loss_hessian_factors as sampled
from lowrank_ggn.core.loss_positions import position_ce_weights
from lowrank_ggn.core.loss_targets import check_targets
from lowrank_ggn.reference import dense_ggn, dense_output_hessian

F64 = torch.float64
N, T, V = 3, 4, 5
#: the draws of the unbiasedness test; a statistic is off by more than 4 standard
#: errors with probability 2Φ(−4) ≈ 6e-5
DRAWS, Z_SCORE = 200, 4.0


def flat_mean(out, y):
    return F.cross_entropy(out.reshape(-1, V), y.reshape(-1))


def flat_sum(out, y):
    return F.cross_entropy(out.reshape(-1, V), y.reshape(-1), reduction="sum")


def hf_shifted(out, y):
    """Hugging Face's causal-LM loss: shift, ignore_index=-100, mean over tokens."""
    logits, labels = out[:, :-1], y[:, 1:]
    return F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)


def smoothed(out, y):
    return F.cross_entropy(out.reshape(-1, V), y.reshape(-1), label_smoothing=0.1)


def squared(out, y):
    return (out - 1.0).square().mean()


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(N, T, V, generator=gen, dtype=F64)
    y = torch.randint(0, V, (N, T), generator=gen)
    y[0, 2:] = -100  # unequal token counts per sample
    return out, y


def _factor_matrix(S: torch.Tensor) -> torch.Tensor:
    """``Σ_c s_c s_cᵀ`` over the whole batch, ``[N·O, N·O]`` (block diagonal)."""
    C, n = S.shape[:2]
    O = S[0, 0].numel()
    H = torch.zeros(n * O, n * O, dtype=S.dtype)
    for i in range(n):
        block = S[:, i].reshape(C, O)
        H[i * O : (i + 1) * O, i * O : (i + 1) * O] = block.T @ block
    return H


@pytest.mark.parametrize("loss", [flat_mean, flat_sum, hf_shifted])
def test_recognised_weights(loss):
    out, y = _batch()
    w = position_ce_weights(lambda o: loss(o, y), out)
    assert w is not None and w.shape == (N, T)
    if loss is hf_shifted:
        keep = torch.zeros(N, T, dtype=F64)
        keep[:, :-1] = (y[:, 1:] != -100).to(F64)
        expected = keep / keep.sum()
    else:
        keep = (y != -100).to(F64)
        expected = keep / (keep.sum() if loss is flat_mean else 1.0)
    report_close(w, expected, name="w")


@pytest.mark.parametrize("loss", [smoothed, squared])
def test_other_losses_are_not_recognised(loss):
    out, y = _batch()
    y = y.clamp(min=0)
    assert position_ce_weights(lambda o: loss(o, y), out) is None


@pytest.mark.parametrize("loss", [flat_mean, flat_sum, hf_shifted])
def test_factors_equal_the_dense_hessian_without_forming_it(loss, monkeypatch):
    out, y = _batch(1)

    def refuse(*args, **kwargs):
        raise AssertionError("a [T·V, T·V] Hessian was formed")

    monkeypatch.setattr(
        "lowrank_ggn.core.loss_factors.autodiff_hessian_factors", refuse
    )
    resolved = resolve_loss(loss)
    S = loss_hessian_factors(resolved, out, y)
    assert S.shape == (T * V, N, T, V)  # V columns per position
    report_close(_factor_matrix(S), dense_output_hessian(loss, out, y), name="S Sᵀ")


def test_smoothed_loss_keeps_the_autodiff_factors():
    out, y = _batch(2)
    y = y.clamp(min=0)
    resolved = resolve_loss(smoothed)
    S = loss_hessian_factors(resolved, out, y)
    assert resolved.positions is None
    report_close(_factor_matrix(S), dense_output_hessian(smoothed, out, y), name="S Sᵀ")


def test_mc_factors_are_unbiased():
    """``E tr(A Σ_m s̃ s̃ᵀ) = tr(A H)`` for three random symmetric ``A``.

    Each mean over DRAWS seeds lies within Z_SCORE standard errors (a correct
    sampler fails one of the three with probability below 2e-4).
    """
    out, y = _batch(3)
    resolved = resolve_loss(hf_shifted)
    check_targets(resolved, out, y)
    H = dense_output_hessian(hf_shifted, out, y)
    gen = torch.Generator().manual_seed(99)
    A = torch.randn(3, *H.shape, generator=gen, dtype=F64)
    A = A + A.transpose(1, 2)
    stats = torch.stack(
        [
            torch.einsum(
                "kij,ij->k", A, _factor_matrix(sampled(resolved, out, y, 1, g))
            )
            for g in (torch.Generator().manual_seed(s) for s in range(DRAWS))
        ]
    )  # [DRAWS, 3]
    exact = torch.einsum("kij,ij->k", A, H)
    mean, se = stats.mean(0), stats.std(0) / math.sqrt(DRAWS)
    assert ((mean - exact).abs() <= Z_SCORE * se + RTOL * exact.abs()).all(), (
        f"MC {mean} ± {se} vs exact {exact}"
    )
    assert sampled(resolved, out, y, 2, torch.Generator()).shape == (2, N, T, V)


def test_ignore_index_lm_spectrum_matches_dense():
    """A tied LM with a ModelOutput and HF's shifted, ignoring loss, unequal counts."""
    model, _, tokens, _ = zoo_patterns.tied_lm(60, N=2)
    labels = tokens.clone()
    labels[0, 1] = -100

    def loss(out, y):
        logits, target = out[:, :-1], y[:, 1:]
        return F.cross_entropy(
            logits.reshape(-1, out.shape[-1]), target.reshape(-1), ignore_index=-100
        )

    before = state_of(model)
    res = ggn_spectrum(model, loss, tokens, labels)
    assert_state_equal(before, model)
    G = dense_ggn(model, loss, tokens, labels)
    expected = torch.linalg.eigvalsh(G).flip(0)[: res.eigenvalues.numel()]
    report_close(res.eigenvalues, expected, name="eigenvalues")
    assert res.eigenvalues.sum().item() == pytest.approx(G.trace().item(), rel=RTOL)
