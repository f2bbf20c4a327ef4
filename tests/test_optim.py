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
* Bootstrap damping: ``tests/test_optim_damping.py``; steps along no direction and
  refusals of bad input: ``tests/test_optim_edge_cases.py``.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
from cases import BN_CASES, CASES, DTYPE, JACOBIAN_ROW_CASES
from test_curvature import SampleCounter
from utils import RTOL, batch_of, call, loss_value, report_close, rho_of

from lowrank_ggn import GGN, SampleMixingWarning
from lowrank_ggn.optim import (
    BootstrapDamping,
    ConstantDamping,
    DampedNewton,
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


def test_readme_example_runs_as_written():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    code = re.search(r"## Damped Newton\n.*?```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - our own README


def test_float32_steps_settle_on_float64_sums_after_one_falls_back(monkeypatch):
    """A float32 step whose top-k needed float64 sums makes later steps skip the
    float32 try (one Gram per step, not two); one that resolved keeps trying."""
    import lowrank_ggn.curvature as curvature

    model, loss, X, y = CASES[0].make()
    model, X = model.float(), X.float()
    y = y.float() if y.is_floating_point() else y
    tries = []
    real = curvature.GGN._native_pairs

    def counted(self, lin):
        tries.append(1)
        return real(self, lin)

    monkeypatch.setattr(curvature.GGN, "_native_pairs", counted)
    opt = DampedNewton(
        model.parameters(), model=model, loss_func=loss, top_k=1, damping=DAMPING
    )
    opt.step(X, y)
    opt.step(X, y)
    assert len(tries) == 2 and opt.options.accumulate is None  # resolved: keeps trying
    monkeypatch.setattr(curvature, "resolves_top", lambda *args: False)
    opt.step(X, y)  # tries, falls back to float64
    opt.step(X, y)
    assert len(tries) == 3 and opt.options.accumulate.value == "float64"
