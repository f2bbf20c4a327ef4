"""Bootstrap damping (ViViT's policy) against the exact bootstrap distribution, float64.

* Statistical tests with a stated confidence (Dvoretzky–Kiefer–Wolfowitz bounds);
  slopes and curvatures resampled together (paired) or apart (sub-sampled).
* Edge cases: no qualifying damping, zero per-sample variance, no directions.
* The per-component warning on sample-mixing models, once per optimiser; option
  checks.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from cases import DTYPE
from scipy.stats import binom
from test_optim import CASE_BY_NAME, TOP_K
from utils import report_close

from lowrank_ggn import SampleMixingWarning
from lowrank_ggn.optim import (
    BootstrapDamping,
    DampedNewton,
    DirectionalData,
)

# ------------------------------------------------------------------ bootstrap damping
#: Dvoretzky–Kiefer–Wolfowitz: P(sup |F_B − F| > ε) ≤ 2 exp(−2 B ε²). Each direction's
#: check below fails for a correct implementation with probability ≤ FAILURE.
FAILURE = 1e-6


def _data(gammas, lambdas, rho, paired=True, mixing=False) -> DirectionalData:
    gammas, lambdas = gammas.to(DTYPE), lambdas.to(DTYPE)
    lam_rho = rho if paired else 1.0 / lambdas.shape[0]
    return DirectionalData(
        eigenvalues=lam_rho * lambdas.sum(0),
        eigenvectors=torch.eye(gammas.shape[1], dtype=DTYPE),
        slopes=rho * gammas.sum(0),
        gammas=gammas,
        lambdas=lambdas,
        rho=rho,
        lambda_rho=lam_rho,
        paired=paired,
        sample_mixing=mixing,
        mixing_modules=("1",) if mixing else (),
    )


def _rule(grid: torch.Tensor, lam: float, a: float) -> float:
    """The rule's choice when every quantile gain is ``gain(a·γ, δ)``.

    ``Q(δ) ∝ (a(λ+δ) − λ/2) / (λ+δ)²``: qualifying where ``≥ 0``, maximal first.
    """
    u = lam + grid
    Q = (a * u - lam / 2) / u.square()
    if not (Q >= 0).any():
        return math.inf
    return float(grid[torch.where(Q >= 0, Q, -torch.inf).argmax()])


@pytest.mark.parametrize(("quantile", "resamples"), [(0.05, 20_000), (0.25, 4_000)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bootstrap_damping_follows_the_exact_bootstrap_distribution(
    quantile, resamples, reduction
):
    r"""Binary slopes make the bootstrap distribution exactly binomial.

    With ``γ_n ∈ {0, h}`` (``m`` of ``N`` equal to ``h``) and constant ``λ_n = λ``,
    a resampled slope is ``γ̂ = ρ h X`` with ``X ~ Binomial(N, m/N)``, and the gain
    ``−γ̂ τ − ½ λ τ²`` increases with ``γ̂`` (``τ < 0``), so ``Q(δ)`` is the gain at the
    empirical ``q``-quantile of ``γ̂``. By DKW that quantile lies between the binomial
    quantiles at ``q ∓ (ε + 2/B)`` with probability ≥ 1 − FAILURE; the rule is
    monotone in it, so the chosen damping lies between the two choices.
    """
    N, h = 40, 1.5
    ms, lams = [30, 24, 36], [1.0, 0.5, 2.0]
    rho = 1.0 / N if reduction == "mean" else 1.0
    gammas = torch.zeros(N, 3)
    for k, m in enumerate(ms):
        gammas[:m, k] = h
    gammas = gammas[torch.randperm(N, generator=torch.Generator().manual_seed(1))]
    lambdas = torch.tensor(lams).expand(N, 3) / (N * rho)  # ρ Σ λ_n = λ
    policy = BootstrapDamping(
        resamples=resamples,
        quantile=quantile,
        generator=torch.Generator().manual_seed(0),
    )
    damping = policy(_data(gammas, lambdas, rho))
    eps = math.sqrt(math.log(2 / FAILURE) / (2 * resamples)) + 2 / resamples
    for k, (m, lam) in enumerate(zip(ms, lams)):
        lo, hi = binom.ppf([max(quantile - eps, 0.0), quantile + eps], N, m / N)
        a_lo, a_hi = lo / m, hi / m  # γ̂_q / γ̄ = X_q / m
        assert (
            _rule(policy.grid, lam, a_hi) <= damping[k] <= _rule(policy.grid, lam, a_lo)
        )
    # the answer depends on the quantile: the median gain prefers the Newton step
    median = BootstrapDamping(resamples=resamples, quantile=0.5)
    assert (median(_data(gammas, lambdas, rho)) <= damping).all()


def test_bootstrap_resamples_slopes_and_curvatures_together():
    """Collinear ``(γ_n, λ_n)``: every paired resample has a positive gain ∝ X.

    Samples are ``(h, ℓ)`` or ``(0, 0)``; a paired resample's gain is
    ``(X/N)(−τh − ½τ²ℓ)``, largest for the smallest damping. Independent draws of
    ``γ`` and ``λ`` (what sub-sampled curvature needs) are more cautious.
    """
    N = 40
    gammas = torch.zeros(N, 1)
    lambdas = torch.zeros(N, 1)
    gammas[::2], lambdas[::2] = 2.0, 3.0
    policy = BootstrapDamping(generator=torch.Generator().manual_seed(0))
    assert policy(_data(gammas, lambdas, 1 / N)).item() == policy.grid[0].item()
    unpaired = policy(_data(gammas, lambdas, 1 / N, paired=False))
    assert unpaired.item() > policy.grid[0].item()


def test_bootstrap_edge_cases():
    # zero per-sample variance: every resample is the batch; the undamped step is best
    gammas = torch.full((8, 2), 0.5)
    lambdas = torch.tensor([[1.0, 0.25]]).expand(8, 2)
    data = _data(gammas, lambdas, 1 / 8)
    policy = BootstrapDamping(generator=torch.Generator().manual_seed(0))
    Q = policy.gain_quantiles(data)
    u = data.eigenvalues[:, None] + policy.grid.to(DTYPE)
    exact = (
        data.slopes[:, None] ** 2
        * (data.eigenvalues[:, None] / 2 + u - data.eigenvalues[:, None])
        / u**2
    )
    report_close(Q, exact, rtol=1e-12, name="noise-free gain")
    assert torch.equal(policy(data), policy.grid[:1].to(DTYPE).expand(2))

    # no qualifying damping: a slope whose sign the resamples do not agree on
    gammas = torch.tensor([1.0, -1.0]).repeat(20)[:, None]
    gammas[0] = 1.5  # mean 0.0125, standard error ≈ 0.16
    data = _data(gammas, torch.ones(40, 1), 1 / 40)
    assert policy(data).item() == math.inf
    assert (policy.gain_quantiles(data) < 0).all()

    # no directions at all
    empty = _data(torch.zeros(5, 0), torch.zeros(5, 0), 0.2)
    assert policy(empty).shape == (0,)


def test_bootstrap_warns_once_per_optimiser_on_mixing_models_only():
    for name in ("bn2d-train-ce", "mlp-ce-mean"):
        case = CASE_BY_NAME[name]
        model, loss, X, y = case.make()
        opt = DampedNewton(
            model.parameters(),
            model=model,
            loss_func=loss,
            top_k=TOP_K,
            damping=BootstrapDamping(generator=torch.Generator().manual_seed(0)),
        )
        for step in range(2):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt.step(X, y)
            caught = [w for w in caught if issubclass(w.category, UserWarning)]
            expected = [SampleMixingWarning] * (case.mixing and step == 0)
            assert [w.category for w in caught] == expected
            if expected:
                text = str(caught[0].message)
                assert "module(s) 1 mix samples" in text
                assert "not a confidence level" in text


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(grid=torch.tensor([-1.0, 1.0])), ValueError, "≥ 0"),
        (dict(grid=torch.zeros(0)), ValueError, "non-empty"),
        (dict(resamples=0), ValueError, "resamples"),
        (dict(resamples=2.5), TypeError, "resamples"),
        (dict(quantile=1.5), ValueError, "quantile"),
        (dict(generator=0), TypeError, "generator"),
    ],
)
def test_bad_bootstrap_options_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        BootstrapDamping(**kwargs)
