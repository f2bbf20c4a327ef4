"""Damped Newton in the top-K GGN eigenspace: steps against brute force, float64.

* Over the shared case list (BatchNorm in train mode included) one step equals the
  dense reference step built from ``dense_ggn``, its ``eigh`` and ``dense_gradient``,
  with constant damping, with and without ``complement_lr``; ``γ_nk`` and ``λ_nk``
  (the latter read off the Gram eigenvectors) equal the brute-force per-sample
  (per-component) derivatives.
* A step changes the parameters only (buffers, modes, ``.grad`` untouched) unless
  ``update_buffers=True``; it takes the forward passes of the spectrum alone and a
  fixed number of extra reverse-mode calls.
* ``state_dict`` round-trips (the bootstrap generator included); schedulers work.
* Bootstrap damping: statistical tests with a stated confidence, its edge cases
  (no qualifying damping, zero per-sample variance) and the per-component warning.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
from cases import BN_CASES, CASES, DTYPE, JACOBIAN_ROW_CASES
from scipy.stats import binom
from test_curvature import SampleCounter
from utils import RTOL, batch_of, call, loss_value, report_close, rho_of

from lowrank_ggn import GGN, SampleMixingWarning
from lowrank_ggn.optim import (
    BootstrapDamping,
    ConstantDamping,
    DampedNewton,
    DampingPolicy,
    DirectionalData,
    NoProgressWarning,
    TopKWarning,
)
from lowrank_ggn.reference import (
    dense_directional_derivatives,
    dense_ggn,
    dense_gradient,
)

ALL_CASES = CASES + [c for c in BN_CASES if c not in CASES]
CASE_BY_NAME = {c.name: c for c in ALL_CASES}
TOP_K = 3
DAMPING = 0.1
#: reverse-mode calls (``torch.autograd.grad``) a step adds to the spectrum's: the
#: gradient (∂L/∂F, then one backward pass of the graph); γ_nk come from the Gram
#: eigenvectors (``gamma_route='factors'``, no pass).
EXTRA_REVERSE_CALLS = 2
#: where the factors do not span ∂L/∂F (``gamma_route='pushforward'``), J e_k by
#: double backward (two passes) and, on the outputs only, ∂L/∂F and the loss
#: Hessian-vector product as well.
PUSHFORWARD_REVERSE_CALLS = 7
#: cases whose exact factors do not span the output gradient (Huber's linear zone).
PUSHFORWARD_CASES = {"mlp-huber"}


def _newton(model, loss, params=None, **kwargs) -> DampedNewton:
    """The optimiser of most tests: top-``TOP_K``, constant damping ``DAMPING``."""
    params = model.parameters() if params is None else params
    kwargs = {
        "top_k": TOP_K,
        "damping": DAMPING,
        "complement_lr": 0.0,
        "momentum": 0.0,
        "keep_eigenvectors": True,
        **kwargs,
    }
    return DampedNewton(params, model=model, loss_func=loss, **kwargs)


def _flat(model, params=None) -> torch.Tensor:
    params = list(model.parameters()) if params is None else params
    return torch.cat([p.detach().flatten() for p in params])


def _dense_problem(model, loss, X, y, params=None):
    """Eigenpairs of the dense GGN (descending) and the gradient, by brute force."""
    G = dense_ggn(model, loss, X, y, params=params)
    evals, evecs = torch.linalg.eigh(G)
    return (
        evals.flip(0),
        evecs.flip(1).T,
        dense_gradient(model, loss, X, y, params=params),
    )


def _reference_step(dense, K, lr, complement_lr, damping):
    """``−lr Σ γ_k/(λ_k+δ) e_k − c_lr (g − Σ γ_k e_k)`` from the dense GGN's ``eigh``."""
    evals, evecs, g = dense
    lam, E = evals[:K], evecs[:K]
    gam = E @ g
    return -lr * (gam / (lam + damping)) @ E - complement_lr * (g - gam @ E)


def _quiet_step(opt, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a step with constant damping never warns
        return opt.step(X, y)


@pytest.mark.parametrize("complement_lr", [0.0, 0.3])
@pytest.mark.parametrize("case", ALL_CASES, ids=[c.name for c in ALL_CASES])
def test_step_equals_dense_reference(case, complement_lr):
    model, loss, X, y = case.make()
    lr = 0.7
    dense = _dense_problem(model, loss, X, y)
    before = _flat(model)
    opt = DampedNewton(
        model.parameters(),
        model=model,
        loss_func=loss,
        top_k=TOP_K,
        damping=ConstantDamping(DAMPING),
        lr=lr,
        complement_lr=complement_lr,
        keep_eigenvectors=True,
    )
    if case.name == "mlp-ce-N1":  # only resolved eigenvalues: N·(C−1) = 2
        with pytest.warns(TopKWarning, match="top_k=3 is above the 2 eigenvalues"):
            info = opt.step(X, y)
    else:
        info = _quiet_step(opt, X, y)
    K = info.eigenvalues.numel()
    assert K == (2 if case.name == "mlp-ce-N1" else TOP_K)
    expected = _reference_step(dense, K, lr, complement_lr, DAMPING)
    report_close(_flat(model) - before, expected, name="Δθ")
    assert info.step_norm == pytest.approx(float(expected.norm()), rel=RTOL)
    assert info.num_directions == K and torch.all(info.damping == DAMPING)
    assert info.path.name == ("full_batch" if case.mixing else "per_sample")
    assert info.sample_mixing == case.mixing

    # γ_nk and λ_nk (λ from the Gram eigenvectors) against brute force
    m2, l2, X2, y2 = case.make()
    rho = rho_of(l2, batch_of(X2))
    gammas, lambdas = dense_directional_derivatives(
        m2, l2, X2, y2, info.eigenvectors, rho
    )
    report_close(info.gammas, gammas, name="γ_nk")
    report_close(info.lambdas, lambdas, name="λ_nk")
    report_close(rho * info.lambdas.sum(0), info.eigenvalues, name="ρ Σ λ_nk = λ_k")
    report_close(info.slopes, rho * info.gammas.sum(0), name="γ_k = ρ Σ γ_nk")
    with torch.no_grad():
        value = float(loss_value(l2, call(m2, X2), y2))
    assert info.loss == pytest.approx(value, rel=RTOL)


def test_parameter_groups_and_subsets():
    """Per-group ``lr``/``complement_lr``; a subset of the parameters defines D."""
    model, loss, X, y = CASE_BY_NAME["bn1d-train-ce"].make()
    first, rest = list(model[0].parameters()), list(model[1:].parameters())
    params = first + rest
    dense = _dense_problem(model, loss, X, y, params)
    ref_a = _reference_step(dense, TOP_K, 0.5, 0.2, DAMPING)
    ref_b = _reference_step(dense, TOP_K, 1.0, 0.0, DAMPING)
    split = sum(p.numel() for p in first)
    expected = torch.cat([ref_a[:split], ref_b[split:]])
    before = _flat(model, params)
    opt = _newton(
        model,
        loss,
        [{"params": first, "lr": 0.5, "complement_lr": 0.2}, {"params": rest}],
    )
    _quiet_step(opt, X, y)
    report_close(_flat(model, params) - before, expected, name="Δθ per group")

    # only the layer below BatchNorm: D is its size, the rest stays
    model, loss, X, y = CASE_BY_NAME["bn1d-train-ce"].make()
    first, rest = list(model[0].parameters()), list(model[1:].parameters())
    dense = _dense_problem(model, loss, X, y, first)
    expected = _reference_step(dense, TOP_K, 1.0, 0.5, DAMPING)
    others, before = _flat(model, rest), _flat(model, first)
    opt = _newton(model, loss, first, complement_lr=0.5)
    info = _quiet_step(opt, X, y)
    assert info.eigenvectors.shape[1] == before.numel()
    report_close(_flat(model, first) - before, expected, name="Δθ of a subset")
    assert torch.equal(_flat(model, rest), others)


@pytest.mark.parametrize("name", ["mlp-ce-mean", "bn1d-train-ce", "mlp-mse-sum"])
def test_subsampled_and_monte_carlo_curvatures(name):
    """``λ_nk`` of the factors in use: sub-sampled rows, MC estimates with ρ Σ = λ_k."""
    model, loss, X, y = CASE_BY_NAME[name].make()
    rows = [0, 2, 5]
    opt = _newton(model, loss, subsampling=rows)
    info = _quiet_step(opt, X, y)
    assert info.gammas.shape[0] == batch_of(X) and info.lambdas.shape[0] == len(rows)
    m2, l2, X2, y2 = CASE_BY_NAME[name].make()
    rho = rho_of(l2, batch_of(X2))
    gammas, lambdas = dense_directional_derivatives(
        m2, l2, X2, y2, info.eigenvectors, rho
    )
    report_close(info.lambdas, lambdas[rows], name="sub-sampled λ_nk")
    assert info.gamma_route == "pushforward"  # factors of 3 rows: no γ_nk of all N
    report_close(info.gammas, gammas, name="γ_nk of every sample")
    rho_s = rho_of(l2, len(rows))
    report_close(rho_s * info.lambdas.sum(0), info.eigenvalues, name="ρ_S Σ λ = λ")

    model, loss, X, y = CASE_BY_NAME[name].make()
    before = _flat(model)
    opt = _newton(model, loss, mc_samples=2, generator=torch.Generator().manual_seed(0))
    info = _quiet_step(opt, X, y)
    rho = rho_of(loss, batch_of(X))
    report_close(rho * info.lambdas.sum(0), info.eigenvalues, name="MC ρ Σ λ = λ")
    m2, l2, X2, y2 = CASE_BY_NAME[name].make()
    gammas, _ = dense_directional_derivatives(m2, l2, X2, y2, info.eigenvectors, rho)
    report_close(info.gammas, gammas, name=f"MC γ_nk ({info.gamma_route})")
    report_close(
        _flat(model) - before,
        -info.coefficients @ info.eigenvectors,
        name="MC step = −Σ c_k e_k",
    )


def _buffers(model) -> dict:
    return {k: v.clone() for k, v in model.named_buffers()}


@pytest.mark.parametrize("name", ["bn2d-train-ce", "bn-mixed-train-eval-ce"])
def test_only_parameters_change_unless_buffers_are_updated(name):
    model, loss, X, y = CASE_BY_NAME[name].make()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    grads = [p.grad for p in model.parameters()]
    buffers, modes = _buffers(model), [m.training for m in model.modules()]
    opt = DampedNewton(
        model.parameters(), model=model, loss_func=loss, top_k=TOP_K, damping=DAMPING
    )
    _quiet_step(opt, X, y)
    after = _buffers(model)
    assert all(torch.equal(buffers[k], after[k]) for k in buffers)
    assert [m.training for m in model.modules()] == modes
    assert all(
        p.grad is g and torch.all(g == 1) for p, g in zip(model.parameters(), grads)
    )

    # update_buffers: the buffers of one training forward pass at the old θ
    model, loss, X, y = CASE_BY_NAME[name].make()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        call(twin, X)
    opt = _newton(model, loss, update_buffers=True)
    info = _quiet_step(opt, X, y)
    expected, after = _buffers(twin), _buffers(model)
    assert all(torch.equal(expected[k], after[k]) for k in expected)
    assert any(not torch.equal(buffers[k], after[k]) for k in buffers)
    spectrum_only = GGN(*CASE_BY_NAME[name].make())
    _quiet(spectrum_only.spectrum, top_k=TOP_K, eigenvectors=True)
    assert info.forward_passes == spectrum_only.forward_passes + 1


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


class ReverseCounter:
    """Counts ``torch.autograd.grad`` calls (``torch.func``'s reverse mode included)."""

    def __init__(self) -> None:
        self.calls = 0
        self._grad = torch.autograd.grad

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._grad(*args, **kwargs)


def _passes(model, fn) -> tuple[int, int]:
    """Samples the model processed and reverse-mode calls of ``fn()``."""
    counter, reverse = SampleCounter(model), ReverseCounter()
    try:
        with mock.patch("torch.autograd.grad", reverse):
            _quiet(fn)
    finally:
        counter.remove()
    return counter.samples, reverse.calls


@pytest.mark.parametrize("top_k", [1, TOP_K])
@pytest.mark.parametrize("case", ALL_CASES, ids=[c.name for c in ALL_CASES])
def test_a_step_shares_the_spectrum_passes(case, top_k):
    """Forward passes of the spectrum alone; a fixed number of reverse-mode calls more.

    The Gram engine's own pass counts are those of the spectrum alone too: no pass per
    sample or per direction is added, whatever N, C, K or the engine path.
    """
    model, loss, X, y = case.make()
    ggn = GGN(model, loss, X, y)
    samples, reverse = _passes(
        model, lambda: ggn.spectrum(top_k=top_k, eigenvectors=True)
    )
    model, loss, X, y = case.make()
    opt = DampedNewton(
        model.parameters(), model=model, loss_func=loss, top_k=top_k, damping=DAMPING
    )
    infos = []
    step_samples, step_reverse = _passes(model, lambda: infos.append(opt.step(X, y)))
    assert step_samples == samples, f"{step_samples} vs {samples} samples"
    assert infos[0].forward_passes == pytest.approx(ggn.forward_passes)
    pushforward = case.name in PUSHFORWARD_CASES
    assert infos[0].gamma_route == ("pushforward" if pushforward else "factors")
    if not pushforward:
        assert step_reverse == reverse + EXTRA_REVERSE_CALLS
    elif case.name not in JACOBIAN_ROW_CASES:  # J e_k by double backward
        assert step_reverse == reverse + PUSHFORWARD_REVERSE_CALLS
    assert dict(infos[0].engine_report.passes) == dict(ggn.engine_report.passes)


def test_state_dict_round_trip_and_scheduler():
    case = CASE_BY_NAME["bn2d-train-ce"]
    model, loss, X, y = case.make()
    gen = torch.Generator().manual_seed(3)
    X2 = torch.randn(X.shape, generator=gen, dtype=DTYPE)

    def make(m, seed, lr):
        policy = BootstrapDamping(generator=torch.Generator().manual_seed(seed))
        return _newton(m, loss, damping=policy, lr=lr)

    opt = make(model, 0, 1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no scheduler order warning
        warnings.simplefilter("ignore", SampleMixingWarning)
        warnings.simplefilter("ignore", NoProgressWarning)  # bootstrap: may be none
        opt.step(X, y)
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.5
    state = opt.state_dict()
    assert state["state"][0]["step"] == 1 and state["damping"]["generator"] is not None

    twin_model = copy.deepcopy(model)
    twin = make(twin_model, 99, 7.0)  # other seed and lr: load_state_dict sets both
    twin.load_state_dict(copy.deepcopy(state))
    assert twin.param_groups[0]["lr"] == 0.5
    assert twin.state_dict()["state"] == state["state"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleMixingWarning)
        a = opt.step(X2, y)
        b = twin.step(X2, y)
    assert torch.equal(a.damping, b.damping)
    assert torch.equal(_flat(model), _flat(twin_model))
    # the step used the scheduled learning rate
    report_close(
        a.step_norm * torch.ones(1),
        0.5 * (a.coefficients @ a.eigenvectors).norm().reshape(1),
        name="‖Δθ‖ = lr ‖Σ c_k e_k‖",
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


def test_steps_along_no_direction_with_infinite_damping():
    model, loss, X, y = CASE_BY_NAME["bn1d-train-ce"].make()
    before = _flat(model)
    opt = DampedNewton(
        model.parameters(),
        model=model,
        loss_func=loss,
        top_k=TOP_K,
        damping=lambda data: torch.full_like(data.eigenvalues, math.inf),
        complement_lr=0.0,
    )
    with pytest.warns(NoProgressWarning, match="0 of 3 directions had a finite"):
        info = opt.step(X, y)
    assert info.num_directions == 0 and info.step_norm == 0.0
    assert torch.equal(_flat(model), before)
    assert torch.equal(info.coefficients, torch.zeros_like(info.coefficients))
    assert isinstance(ConstantDamping(1.0), DampingPolicy)


def test_a_zero_ggn_gives_no_directions():
    """Dead ReLUs below the selected layer: no resolved eigenvalue, K = 0, no step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)
    ).to(DTYPE)
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    X, y = torch.randn(6, 4, dtype=DTYPE), torch.randint(0, 3, (6,))
    policy = BootstrapDamping(generator=torch.Generator().manual_seed(0))
    opt = DampedNewton(
        model[0].parameters(),
        model=model,
        loss_func=torch.nn.CrossEntropyLoss(),
        top_k=TOP_K,
        damping=policy,
        complement_lr=0.1,
    )
    before = _flat(model)
    with pytest.warns(TopKWarning, match="above the 0 eigenvalues"):
        info = opt.step(X, y)
    assert info.eigenvalues.numel() == 0 and info.num_directions == 0
    assert info.gammas.shape == (6, 0) and info.lambdas.shape == (6, 0)
    assert info.step_norm == 0.0 and torch.equal(_flat(model), before)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(top_k=0), ValueError, "top_k"),
        (dict(lr=-1.0), ValueError, "lr must be finite"),
        (dict(complement_lr=math.nan), ValueError, "complement_lr"),
        (dict(damping="big"), TypeError, "damping must be a DampingPolicy"),
        (dict(damping=-1.0), ValueError, "damping must be ≥ 0"),
        (dict(generator=torch.Generator()), ValueError, "only used with mc_samples"),
        (dict(model="net"), TypeError, "model must be a torch.nn.Module"),
        (
            dict(params=[torch.nn.Parameter(torch.zeros(2))]),
            ValueError,
            "parameters of",
        ),
    ],
)
def test_bad_options_are_refused(kwargs, error, match):
    model, loss, X, y = CASES[0].make()
    options = dict(
        params=model.parameters(), model=model, loss_func=loss, top_k=2, damping=0.1
    )
    options.update(kwargs)
    with pytest.raises(error, match=match):
        DampedNewton(options.pop("params"), **options)


@pytest.mark.parametrize(
    ("policy", "match"),
    [
        (lambda d: torch.zeros(5), "one damping per direction"),
        (lambda d: torch.full_like(d.eigenvalues, math.nan), "NaN or negative"),
        (lambda d: -torch.ones_like(d.eigenvalues), "NaN or negative"),
    ],
)
def test_bad_policy_output_is_refused_before_the_parameters_change(policy, match):
    model, loss, X, y = CASES[0].make()
    before = _flat(model)
    opt = DampedNewton(
        model.parameters(), model=model, loss_func=loss, top_k=2, damping=policy
    )
    with pytest.raises(ValueError, match=match):
        opt.step(X, y)
    assert torch.equal(_flat(model), before)


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("lr", math.nan, ValueError),
        ("lr", -0.5, ValueError),
        ("complement_lr", math.inf, ValueError),
        ("lr", "fast", TypeError),
    ],
)
def test_param_group_rates_set_later_are_checked_at_each_step(name, value, error):
    """A scheduler or a hand edit after construction: refused, nothing changes."""
    model, loss, X, y = CASES[0].make()
    before = _flat(model)
    opt = DampedNewton(
        model.parameters(), model=model, loss_func=loss, top_k=2, damping=1.0
    )
    opt.param_groups[0][name] = value
    with pytest.raises(error, match=rf"param_groups\[0\]: {name} must be"):
        opt.step(X, y)
    assert torch.equal(_flat(model), before)


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


def test_readme_example_runs_as_written():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    code = re.search(r"## Damped Newton\n.*?```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - our own README
