"""Randomized property tests (hypothesis) against the dense ``torch.func`` reference.

Random small MLPs and CNNs (with and without BatchNorm in train and eval mode,
LayerNorm, Dropout in eval mode, dense or spatial outputs), random batch sizes,
output sizes, losses (cross-entropy with class or probability targets, MSE, BCE),
reductions and dtypes. Invariants, float64:

1. the nonzero spectrum equals ``eigvalsh`` of the dense GGN (``RTOL``);
2. the sum of the eigenvalues equals ``tr G`` (``RTOL``);
3. ``top_k`` returns exactly the first ``k`` of the full spectrum (bitwise);
4. the same call twice gives bitwise the same eigenvalues and eigenvectors;
5. the eigenvectors are orthonormal eigenvectors of the dense GGN, within the
   round-off bounds ``‖G e_k − λ_k e_k‖ ≤ RTOL · λ_max · a_k`` and
   ``|e_jᵀ e_k − δ_jk| ≤ RTOL · a_j a_k`` with ``a_k = √(λ_max / λ_k)``: dividing by
   ``√λ_k`` amplifies the Gram round-off by ``a_k``;
6. the model is left bitwise as it was.

In float32, the spectrum is compared with a float64 recomputation on a float64 copy
of the same model and data, with ``RTOL_FLOAT32``.

Runtime is bounded: fixed ``max_examples``, ``derandomize=True`` (the same examples
on every run, so CI is reproducible), no deadline (first calls compile vmap paths).
Set ``LOWRANK_GGN_PROPERTY_LOG=<file>`` to record every generated case as JSON lines.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from utils import (
    RTOL,
    assert_spectrum_matches,
    assert_state_equal,
    report_close,
    state_of,
)

from lowrank_ggn import ggn_spectrum
from lowrank_ggn.reference import dense_ggn

#: float32 against a float64 recomputation, relative to λ_max: float32 round-off
#: (eps = 1.2e-7) amplified by the forward pass and N·C-term sums. Normalisation
#: layers divide by standard deviations: the largest error on the 48 float32 cases
#: is 2.9e-5 (LayerNorm over 2 features, whose derivative is 1/|x_1 − x_2|); all
#: others are below 1.4e-6.
RTOL_FLOAT32 = 1e-4

SETTINGS = dict(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
#: Examples per normalisation kind (4 kinds): 64 float64 cases in all.
EXAMPLES_FLOAT64 = 16
#: Examples per normalisation kind in float32: 48 cases in all.
EXAMPLES_FLOAT32 = 12


@dataclass(frozen=True)
class Spec:
    """One randomly drawn problem."""

    kind: str  # "mlp" or "cnn"
    norm: str  # "none", "bn-train", "bn-eval", "layernorm"
    activation: str
    dropout: bool  # a Dropout(p=0.5) module, in eval mode
    spatial_outputs: bool  # cnn only: [N, K, 2, 2] outputs instead of [N, K]
    depth: int
    width: int
    loss: str  # "ce", "ce-prob", "mse", "bce"
    reduction: str
    N: int
    K: int
    seed: int


KINDS = ["mlp", "cnn"]
NORMS = ["none", "bn-train", "bn-eval", "layernorm"]
LOSSES = ["ce", "ce-prob", "mse", "bce"]


@st.composite
def specs(draw, norm: str) -> Spec:
    """Random problems with one kind of normalisation layer.

    ``norm`` is a pytest parameter, so that every kind is covered (a derandomized
    draw of 40 examples once left BatchNorm in train mode out); hypothesis draws
    everything else.
    """
    kind = draw(st.sampled_from(KINDS))
    return Spec(
        kind=kind,
        norm=norm,
        activation=draw(st.sampled_from(["tanh", "relu", "sigmoid"])),
        dropout=draw(st.booleans()),
        spatial_outputs=kind == "cnn" and draw(st.booleans()),
        depth=draw(st.integers(1, 2)),
        width=draw(st.integers(2, 5)),
        loss=draw(st.sampled_from(LOSSES)),
        reduction=draw(st.sampled_from(["mean", "sum"])),
        # sampled_from shrinks towards the first entry; edge cases N=1, K=1 last
        N=draw(st.sampled_from([4, 3, 5, 2] + ([] if norm == "bn-train" else [1]))),
        K=draw(st.sampled_from([3, 2, 4, 1])),
        seed=draw(st.integers(0, 2**16)),
    )


_ACT = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


def _block(spec: Spec, fan_in: int, conv: bool) -> list[nn.Module]:
    w = spec.width
    layers: list[nn.Module] = [
        nn.Conv2d(fan_in, w, 3, padding=1) if conv else nn.Linear(fan_in, w)
    ]
    if spec.norm.startswith("bn"):
        layers.append(nn.BatchNorm2d(w) if conv else nn.BatchNorm1d(w))
    elif spec.norm == "layernorm":
        layers.append(nn.LayerNorm([w, 2, 2] if conv else [w]))
    layers.append(_ACT[spec.activation]())
    if spec.dropout:
        layers.append(nn.Dropout(0.5))
    return layers


def build(spec: Spec, dtype: torch.dtype = torch.float64):
    """``(model, loss_func, inputs, targets)`` for ``spec``, deterministic."""
    torch.manual_seed(spec.seed)
    gen = torch.Generator().manual_seed(spec.seed + 1)
    layers: list[nn.Module] = []
    if spec.kind == "mlp":
        fan_in, in_shape = 3, (spec.N, 3)
        for _ in range(spec.depth):
            layers += _block(spec, fan_in, conv=False)
            fan_in = spec.width
        layers.append(nn.Linear(fan_in, spec.K))
        out_shape = (spec.N, spec.K)
    else:
        fan_in, in_shape = 2, (spec.N, 2, 2, 2)
        for _ in range(spec.depth):
            layers += _block(spec, fan_in, conv=True)
            fan_in = spec.width
        if spec.spatial_outputs:
            layers.append(nn.Conv2d(fan_in, spec.K, 1))
            out_shape = (spec.N, spec.K, 2, 2)
        else:
            layers += [nn.Flatten(), nn.Linear(fan_in * 4, spec.K)]
            out_shape = (spec.N, spec.K)
    model = nn.Sequential(*layers).to(dtype)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.3, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.normal_(0, 0.3, generator=gen)
    model.train(spec.norm == "bn-train")
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    X = torch.randn(in_shape, generator=gen, dtype=dtype)
    if spec.loss == "ce":
        loss = nn.CrossEntropyLoss(reduction=spec.reduction)
        y = torch.randint(0, spec.K, out_shape[:1] + out_shape[2:], generator=gen)
    elif spec.loss == "ce-prob":
        loss = nn.CrossEntropyLoss(reduction=spec.reduction)
        y = torch.rand(out_shape, generator=gen, dtype=dtype)  # unnormalised, >= 0
    elif spec.loss == "mse":
        loss = nn.MSELoss(reduction=spec.reduction)
        y = torch.randn(out_shape, generator=gen, dtype=dtype)
    else:
        loss = nn.BCEWithLogitsLoss(reduction=spec.reduction)
        y = torch.rand(out_shape, generator=gen, dtype=dtype)
    return model, loss, X, y


def _log(spec: Spec, **figures) -> None:
    path = os.environ.get("LOWRANK_GGN_PROPERTY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({**asdict(spec), **figures}) + "\n")


@pytest.mark.parametrize("norm", NORMS)
def test_spectrum_properties_float64(norm):
    @settings(max_examples=EXAMPLES_FLOAT64, **SETTINGS)
    @given(spec=specs(norm), k_fraction=st.floats(0.0, 1.0))
    def check(spec, k_fraction):
        _check_float64(spec, k_fraction)

    check()


def _check_float64(spec: Spec, k_fraction: float) -> None:
    model, loss, X, y = build(spec)
    before = state_of(model)
    res = ggn_spectrum(model, loss, X, y, eigenvectors=True)
    again = ggn_spectrum(model, loss, X, y, eigenvectors=True)
    assert_state_equal(before, model)  # 6
    G = dense_ggn(model, loss, X, y)
    lam = res.eigenvalues

    assert_spectrum_matches(lam, G)  # 1
    report_close(lam.sum(), G.trace(), name="Σλ vs tr G")  # 2
    assert torch.equal(lam, again.eigenvalues), "eigenvalues not deterministic"  # 4
    assert torch.equal(res.eigenvectors, again.eigenvectors), "eigenvectors differ"
    if res.rank:
        k = 1 + int(k_fraction * (res.rank - 1))
        top = ggn_spectrum(model, loss, X, y, top_k=k)
        assert torch.equal(top.eigenvalues, lam[:k]), "top_k is not a prefix"  # 3
        E = res.eigenvectors  # 5
        residual = (G @ E.T - E.T * lam).norm(dim=0)
        bound = RTOL * lam[0] * (lam[0] / lam).sqrt()
        assert (residual <= bound).all(), f"‖Ge − λe‖ {residual.max():.2e}"
        amp = (lam[0] / lam).sqrt()  # round-off amplification of each e_k
        gram_err = (E @ E.T - torch.eye(res.rank, dtype=E.dtype)).abs()
        assert (gram_err <= RTOL * amp[:, None] * amp[None, :]).all(), (
            f"EEᵀ − I up to {gram_err.max():.2e}"
        )
    _log(
        spec,
        dtype="float64",
        rank=res.rank,
        columns=res.num_columns,
        path=res.path.name,
    )


@pytest.mark.parametrize("norm", NORMS)
def test_spectrum_float32_against_float64_recomputation(norm):
    @settings(max_examples=EXAMPLES_FLOAT32, **SETTINGS)
    @given(spec=specs(norm))
    def check(spec):
        _check_float32(spec)

    check()


def _check_float32(spec: Spec) -> None:
    model, loss, X, y = build(spec, torch.float32)
    before = state_of(model)
    res = ggn_spectrum(model, loss, X, y)
    assert_state_equal(before, model)
    assert res.eigenvalues.dtype == torch.float32
    model64 = copy.deepcopy(model).double()
    y64 = y.double() if y.is_floating_point() else y
    ref = ggn_spectrum(model64, loss, X.double(), y64)
    lam32, lam64 = res.eigenvalues.double(), ref.eigenvalues
    scale = lam64[0].item() if ref.rank else 0.0
    r = min(res.rank, ref.rank)
    err = (lam32[:r] - lam64[:r]).abs().max().item() if r else 0.0
    assert err <= RTOL_FLOAT32 * scale, f"float32 off by {err:.2e} (λ_max {scale:.2e})"
    for extra in (lam32[r:], lam64[r:]):  # eigenvalues that only one run kept
        assert (extra <= RTOL_FLOAT32 * scale).all(), f"unmatched eigenvalues {extra}"
    report_close(lam32.sum(), lam64.sum(), rtol=RTOL_FLOAT32, name="Σλ float32")
    _log(
        spec,
        dtype="float32",
        rank=res.rank,
        columns=res.num_columns,
        rel_err=err / scale if scale else 0.0,
    )
