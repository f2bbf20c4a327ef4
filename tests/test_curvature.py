"""The GGN object: equal to the functional API and to brute force, and it linearises once.

Over the shared case list (BatchNorm in train mode included), float64:

* every quantity of :class:`lowrank_ggn.GGN` equals the one-call function's and the
  dense reference (``torch.func`` Jacobians of the whole batch);
* the sequence ``GGN(...)``, ``.spectrum(top_k=k, eigenvectors=True)``,
  ``.moments()``, ``.directional_derivatives(eigenvectors)`` runs the model on at
  most three batches' worth of samples, path and determinism checks included,
  counted by a hook on the model itself (vmapped per-sample calls count their
  samples) — and the path check's probe of at most four samples on top;
* the model is never changed, and a changed model is refused.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import BN_CASES, CASES
from utils import (
    RTOL,
    assert_spectrum_matches,
    assert_state_equal,
    batch_of,
    report_close,
    state_of,
)

from lowrank_ggn import (
    GGN,
    block_gram_matrices,
    directional_derivatives,
    ggn_block_spectra,
    ggn_spectrum,
    gradient_moments,
    gram_matrix,
    per_layer_groups,
)
from lowrank_ggn.core.model import samples_in
from lowrank_ggn.reference import dense_ggn, dense_gradient

ALL_CASES = CASES + [c for c in BN_CASES if c not in CASES]
PROBE = 8  # the path check's ≤ 4 single samples, the memory budget's ≤ 4-sample probe
#: cases with parameters in no captured layer: the LSTM, addmm layers and tied
#: embeddings, a 0-dim scale (self-attention's projections are captured)
GENERIC_CASES = {"lstm-lm-ce", "tied-conv1d-lm", "zero-dim-param-ce"}


class SampleCounter:
    """Counts the samples every call of the model processes (vmapped ones too)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.samples = 0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs) -> None:
        first = next(
            t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)
        )
        self.samples += samples_in(first)

    def remove(self) -> None:
        self.handle.remove()


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.name for c in ALL_CASES])
def test_object_equals_functional_api_and_brute_force(case):
    model, loss, X, y = case.make()
    before = state_of(model)
    ggn = GGN(model, loss, X, y)
    spec = ggn.spectrum(eigenvectors=True)
    mom = _quiet(ggn.moments, per_component=True)
    dd = _quiet(ggn.directional_derivatives, spec)
    assert_state_equal(before, model)

    # functional API on a fresh copy of the same case
    m2, l2, X2, y2 = case.make()
    report_close(ggn.gram(), gram_matrix(m2, l2, X2, y2), name="Gram")
    f_spec = ggn_spectrum(m2, l2, X2, y2, eigenvectors=True)
    report_close(spec.eigenvalues, f_spec.eigenvalues, name="eigenvalues")
    report_close(spec.eigenvectors.abs(), f_spec.eigenvectors.abs(), name="|e_k|")
    f_mom = _quiet(gradient_moments, m2, l2, X2, y2, per_component=True)
    for field in ("mean", "variance", "second_moment", "norms", "gradient"):
        report_close(getattr(mom, field), getattr(f_mom, field), name=field)
    f_dd = _quiet(directional_derivatives, m2, l2, X2, y2, f_spec)
    report_close(dd.lambdas, f_dd.lambdas, name="λ_nk")
    report_close(dd.gammas.abs(), f_dd.gammas.abs(), name="|γ_nk|")  # sign of e_k

    # brute force
    G = dense_ggn(model, loss, X, y)
    assert_spectrum_matches(spec.eigenvalues, G)
    if spec.rank:
        E = spec.eigenvectors
        residual = (G @ E.T - E.T * spec.eigenvalues).norm(dim=0)
        assert residual.max() <= RTOL * spec.eigenvalues[0]
        report_close(dd.curvatures, spec.eigenvalues, name="eᵀGe = λ")
    g = dense_gradient(model, loss, X, y)
    report_close(mom.gradient, g, name="gradient")
    report_close(dd.slopes, spec.eigenvectors @ g, name="eᵀ∇L")


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.name for c in ALL_CASES])
def test_spectrum_moments_directional_take_at_most_three_forward_passes(case):
    model, loss, X, y = case.make()
    N = batch_of(X)
    counter = SampleCounter(model)
    try:
        ggn = GGN(model, loss, X, y)
        assert counter.samples == 0, "construction must not run the model"
        spec = ggn.spectrum(top_k=3, eigenvectors=True)
        _quiet(ggn.moments)
        _quiet(ggn.directional_derivatives, spec)
    finally:
        counter.remove()
    # parameters outside the captured layers (attention projections, LSTM weights)
    # need per-sample VJPs on the per-sample path: one vmapped pass more
    generic = "generic" in {str(t) for t in ggn.engine_report.layers.values()}
    extra = int(generic and ggn.path.name == "per_sample")
    assert counter.samples <= (3 + extra) * N + PROBE, (
        f"{counter.samples} samples processed, {counter.samples / N:.2f} batches"
    )
    assert generic == (case.name in GENERIC_CASES), ggn.engine_report.layers
    # the object's own count agrees with the hook (it counts the probe too)
    assert ggn.forward_passes == pytest.approx(counter.samples / N)


def test_full_batch_path_needs_two_forward_passes_for_everything():
    """BatchNorm in train mode: the graph serves moments and directions too."""
    case = next(c for c in CASES if c.name == "bn2d-train-ce")
    model, loss, X, y = case.make()
    ggn = GGN(model, loss, X, y)
    spec = ggn.spectrum(top_k=3, eigenvectors=True)
    _quiet(ggn.moments)
    _quiet(ggn.directional_derivatives, spec)
    assert ggn.path.name == "full_batch"
    N = batch_of(X)
    assert ggn.forward_passes == 2 + min(N, 4) / N  # and the memory budget's probe
    assert "forward" not in ggn.engine_report.passes  # reused the linearisation's


def test_cached_gram_and_repeated_spectra_cost_nothing_more():
    model, loss, X, y = CASES[0].make()
    ggn = GGN(model, loss, X, y)
    gram = ggn.gram()
    passes = ggn.forward_passes
    backward = dict(ggn.engine_report.passes)
    assert ggn.gram() is gram
    a = ggn.spectrum()
    b = ggn.spectrum(top_k=2)
    report_close(b.eigenvalues, a.eigenvalues[:2], name="top 2")
    assert ggn.forward_passes == passes
    assert dict(ggn.engine_report.passes) == backward


def test_block_methods_equal_block_functions():
    model, loss, X, y = next(c for c in CASES if c.name == "bn2d-train-ce").make()
    groups = per_layer_groups(model)
    ggn = GGN(model, loss, X, y)
    spectra = ggn.block_spectra(groups, eigenvectors=True)
    grams = ggn.block_grams(groups)
    m2, l2, X2, y2 = next(c for c in CASES if c.name == "bn2d-train-ce").make()
    groups2 = per_layer_groups(m2)
    for a, b in zip(grams, block_gram_matrices(m2, l2, X2, y2, groups2)):
        report_close(a, b, name="block Gram")
    for a, b in zip(spectra, ggn_block_spectra(m2, l2, X2, y2, groups2)):
        report_close(a.eigenvalues, b.eigenvalues, name="block eigenvalues")


def test_a_changed_model_is_refused():
    model, loss, X, y = CASES[0].make()
    ggn = GGN(model, loss, X, y)
    ggn.spectrum()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # an optimizer step
    with pytest.raises(RuntimeError, match="changed since this GGN was created"):
        ggn.spectrum()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(chunk=0), "chunk"),
        (dict(engine="fast"), "engine must be one of"),
        (dict(accumulate="float16"), "accumulate"),
        (dict(path="sometimes"), "path must be None"),
        (dict(mc_samples=0), "mc_samples"),
        (dict(params=[torch.zeros(2)]), "not a parameter of model"),
    ],
)
def test_bad_options_are_refused_at_construction(kwargs, match):
    model, loss, X, y = CASES[0].make()
    counter = SampleCounter(model)
    with pytest.raises((ValueError, TypeError), match=match):
        GGN(model, loss, X, y, **kwargs)
    counter.remove()
    assert counter.samples == 0


def test_bad_method_options_are_refused_before_the_model_runs():
    model, loss, X, y = CASES[0].make()
    ggn = GGN(model, loss, X, y)
    for call, match in [
        (lambda: ggn.spectrum(top_k=0), "top_k"),
        (lambda: ggn.spectrum(rtol=-1.0), "rtol"),
        (lambda: ggn.spectrum(eigenvectors=-2), "eigenvectors"),
        (lambda: ggn.spectrum(solver="lanczos"), "needs top_k"),
        (lambda: ggn.block_grams([{"params": []}]), "empty"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            call()
    assert ggn.forward_passes == 0


def test_gradient_and_audit_of_the_object():
    case = next(c for c in CASES if c.name == "bn1d-train-ce")
    model, loss, X, y = case.make()
    ggn = GGN(model, loss, X, y)
    report_close(ggn.gradient(), dense_gradient(model, loss, X, y), name="∇L")
    report = ggn.audit()
    assert not report.sample_independent and report.mixing_modules == ("1",)


def test_zero_directions_and_parameters_above_batch_norm_only():
    """Edge cases: K = 0 directions; bn_split when no parameter sits below the BN."""
    model, loss, X, y = next(c for c in CASES if c.name == "bn1d-train-ce").make()
    head = list(model[3].parameters())
    ggn = GGN(model, loss, X, y, params=head, strategy="bn_split")
    spec = ggn.spectrum(eigenvectors=True)
    assert_spectrum_matches(spec.eigenvalues, dense_ggn(model, loss, X, y, params=head))
    D = sum(p.numel() for p in head)
    dd = _quiet(ggn.directional_derivatives, torch.zeros(0, D, dtype=X.dtype))
    assert dd.gammas.shape == (batch_of(X), 0) and dd.lambdas.shape == (batch_of(X), 0)


@pytest.mark.parametrize("how", ["data-add", "data-assign", "vector-to-parameters"])
def test_writes_that_bypass_autograd_are_refused(how):
    """Value changes without a version bump: no stale spectrum, no mixed moments."""
    model, loss, X, y = CASES[0].make()
    ggn = GGN(model, loss, X, y)
    ggn.spectrum()
    p = next(model.parameters())
    if how == "data-add":
        p.data.add_(0.1)
    elif how == "data-assign":
        p.data = p.data + 0.1
    else:
        flat = torch.nn.utils.parameters_to_vector(model.parameters())
        torch.nn.utils.vector_to_parameters(flat * 1.01, model.parameters())
    for call in (ggn.spectrum, ggn.moments):
        with pytest.raises(RuntimeError, match="changed since this GGN was created"):
            call()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_parametrized_spectral_norm_is_not_refused(train):
    """Its power iteration writes buffers that every call restores: not a change."""
    torch.manual_seed(0)
    sn = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(4, 5))
    model = torch.nn.Sequential(sn, torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    model.train(train)
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    loss = torch.nn.CrossEntropyLoss()
    ggn = GGN(model, loss, X, y)
    spec = ggn.spectrum()
    ggn.moments()  # a second method call on the same object
    G = dense_ggn(model, loss, X, y)
    expected = torch.linalg.eigvalsh(G).flip(0)[: spec.eigenvalues.numel()]
    report_close(spec.eigenvalues, expected, name="eigenvalues")
