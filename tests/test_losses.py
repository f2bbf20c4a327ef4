"""Any per-sample loss: autodiff loss-Hessian factors against the dense reference.

Every loss here goes through :class:`lowrank_ggn.core.losses.autodiff.AutodiffLoss`.
The truth is :func:`lowrank_ggn.reference.dense_output_hessian`, the ``torch.func``
Hessian of the whole batch loss (no per-sample split assumed), in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from utils import RTOL, assert_spectrum_matches, report_close

from lowrank_ggn import ggn_spectrum, gram_matrix, sampled_loss_hessian_factors
from lowrank_ggn.core.loss_factors import loss_hessian_factors, sample_weight
from lowrank_ggn.core.losses import autodiff as loss_autodiff
from lowrank_ggn.core.losses.autodiff import AutodiffLoss
from lowrank_ggn.core.losses.registry import resolve_loss
from lowrank_ggn.reference import (
    dense_ggn,
    dense_jacobian,
    dense_output_hessian,
    dense_outputs,
)

D = torch.float64
N = 5

#: Float32 agreement with the float64 reference, relative to the largest entry
#: (measured worst case over LOSSES: about 3e-7).
RTOL_FLOAT32 = 1e-5


# --- targets, as functions of the outputs [N, *out] ------------------------------
def _real(o: Tensor, g: torch.Generator) -> Tensor:
    return torch.randn(o.shape, generator=g, dtype=o.dtype)


def _gaussian(o: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    var = torch.rand(o.shape, generator=g, dtype=o.dtype) + 0.5
    return _real(o, g), var


def _counts(o: Tensor, g: torch.Generator) -> Tensor:
    return torch.randint(0, 5, o.shape, generator=g).to(o.dtype)


def _probs(o: Tensor, g: torch.Generator) -> Tensor:
    return _real(o, g).softmax(dim=-1)


def _log_probs(o: Tensor, g: torch.Generator) -> Tensor:
    return _real(o, g).log_softmax(dim=-1)


def _classes(o: Tensor, g: torch.Generator) -> Tensor:
    return torch.randint(0, o.shape[1], (o.shape[0], *o.shape[2:]), generator=g)


def _last_dim_classes(o: Tensor, g: torch.Generator) -> Tensor:
    return torch.randint(0, o.shape[-1], o.shape[:-1], generator=g)


def _binary(o: Tensor, g: torch.Generator) -> Tensor:
    return torch.rand(o.shape, generator=g, dtype=o.dtype)


def _ce_over_positions(o: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy over positions: ``o`` ``[N, T, K]``, ``y`` ``[N, T]``, mean."""
    return F.cross_entropy(o.flatten(0, 1), y.flatten())


class CoupledMSE(nn.MSELoss):
    """An MSE subclass with a term that couples samples (batch-mean penalty)."""

    def forward(self, o: Tensor, y: Tensor) -> Tensor:
        return super().forward(o, y) + o.mean(0).square().sum()


class SumClaimingMean(nn.Module):
    """Says ``reduction='mean'`` but sums over the batch."""

    reduction = "mean"

    def forward(self, o: Tensor, y: Tensor) -> Tensor:
        return (o - y).square().sum()


@dataclass(frozen=True)
class LossCase:
    """A loss, its targets and the head that puts the outputs in its domain."""

    name: str
    loss: Callable[[], object]
    targets: Callable[[Tensor, torch.Generator], object]
    reduction: str = "mean"
    out: tuple[int, ...] = (3,)
    head: Callable[[], nn.Module] = field(default=nn.Identity)
    zero: bool = False  # Hessian zero: the GGN vanishes

    def __repr__(self) -> str:
        return self.name


LOSSES = [
    LossCase("huber", lambda: nn.HuberLoss(delta=0.7), _real),
    LossCase(
        "huber-sum-2d", lambda: nn.HuberLoss(reduction="sum"), _real, "sum", (2, 3)
    ),
    LossCase("smooth-l1", lambda: nn.SmoothL1Loss(beta=0.5), _real),
    LossCase("gaussian-nll", nn.GaussianNLLLoss, _gaussian),
    LossCase(
        "gaussian-nll-full-sum",
        lambda: nn.GaussianNLLLoss(full=True, reduction="sum"),
        _gaussian,
        "sum",
    ),
    LossCase("poisson-log", nn.PoissonNLLLoss, _counts),
    LossCase(
        "poisson-rate",
        lambda: nn.PoissonNLLLoss(log_input=False, reduction="sum"),
        _counts,
        "sum",
        head=nn.Softplus,
    ),
    LossCase(
        "kl-batchmean",
        lambda: nn.KLDivLoss(reduction="batchmean"),
        _probs,
        head=lambda: nn.LogSoftmax(dim=-1),
        zero=True,
    ),
    LossCase(
        "kl-log-target",
        lambda: nn.KLDivLoss(reduction="batchmean", log_target=True),
        _log_probs,
        head=lambda: nn.LogSoftmax(dim=-1),
        zero=True,
    ),
    LossCase("l1", nn.L1Loss, _real, zero=True),
    LossCase("nll", nn.NLLLoss, _classes, head=lambda: nn.LogSoftmax(1), zero=True),
    LossCase(
        "ce-label-smoothing", lambda: nn.CrossEntropyLoss(label_smoothing=0.2), _classes
    ),
    LossCase(
        "ce-class-weights-sum",
        lambda: nn.CrossEntropyLoss(
            weight=torch.tensor([1.0, 2.0, 0.5], dtype=D), reduction="sum"
        ),
        _classes,
        "sum",
    ),
    LossCase(
        "bce-pos-weight",
        lambda: nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 3.0, 0.5], dtype=D)),
        _binary,
    ),
    LossCase("lambda-quartic", lambda: lambda o, y: ((o - y) ** 4).mean(), _real),
    LossCase(
        "lambda-quartic-sum", lambda: lambda o, y: ((o - y) ** 4).sum(), _real, "sum"
    ),
    LossCase(
        "lambda-ce-positions", lambda: _ce_over_positions, _last_dim_classes, out=(2, 3)
    ),
    LossCase(
        "lambda-kl-logits",
        lambda: lambda o, y: F.kl_div(o.log_softmax(-1), y, reduction="batchmean"),
        _probs,
    ),
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _problem(case: LossCase, dtype: torch.dtype = D, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = case.head()(torch.randn(N, *case.out, generator=gen, dtype=D) * 1.5)
    return out.to(dtype), _cast(case.targets(out, gen), dtype)


def _cast(targets: object, dtype: torch.dtype) -> object:
    if isinstance(targets, tuple):
        return tuple(_cast(t, dtype) for t in targets)
    return targets.to(dtype) if targets.is_floating_point() else targets


def _blocks(S: Tensor) -> Tensor:
    """``diag_n(Σ_c s_nc s_ncᵀ)`` ``[N·O, N·O]`` from ``S`` ``[C, N, *out]``."""
    per_sample = S.reshape(*S.shape[:2], -1).movedim(1, 0)  # [N, C, O]
    return torch.block_diag(*(s.T @ s for s in per_sample))


# --- factors against the dense Hessian of the batch loss ---------------------------
@pytest.mark.parametrize("case", LOSSES, ids=repr)
def test_factors_reproduce_the_dense_hessian(case):
    """``S Sᵀ`` equals ``∇²_F L`` of the batch loss: blocks and zeros between samples."""
    out, y = _problem(case)
    loss = resolve_loss(case.loss())
    assert isinstance(loss, AutodiffLoss)
    S = loss_hessian_factors(loss, out, y)
    assert S.shape[1:] == out.shape and 1 <= S.shape[0] <= math.prod(case.out)
    H = dense_output_hessian(case.loss(), out, y)
    report_close(_blocks(S), H, name=f"S Sᵀ for {case.name}")
    assert loss.reduction == case.reduction and loss.reduction_known
    assert sample_weight(loss, N) == (1.0 if case.reduction == "sum" else 1.0 / N)
    if case.zero:
        assert H.abs().max() == 0 and S.abs().max() == 0


@pytest.mark.parametrize("case", LOSSES[:6] + LOSSES[-2:], ids=repr)
def test_float32_factors_pass_the_checks(case):
    """Float32: the structure check does not refuse round-off; factors ≈ float64."""
    out, y = _problem(case, torch.float32)
    S = loss_hessian_factors(case.loss(), out, y)
    assert S.dtype == torch.float32
    out64, y64 = _problem(case)
    H = dense_output_hessian(case.loss(), out64, y64)
    report_close(_blocks(S.double()), H, RTOL_FLOAT32, f"float32 S Sᵀ for {case.name}")


def test_rank_is_kept():
    """CE with label smoothing: ``diag p − p pᵀ`` scaled, rank ``K − 1``; MSE full rank."""
    case = next(c for c in LOSSES if c.name == "ce-label-smoothing")
    out, y = _problem(case)
    assert loss_hessian_factors(case.loss(), out, y).shape[0] == 2
    out = torch.randn(N, 4, dtype=D)
    assert loss_hessian_factors(AutodiffLoss(nn.MSELoss()), out, out).shape[0] == 4


def test_vmap_and_loop_agree(monkeypatch):
    """The loop over samples (losses without batching rules) gives the same factors."""
    case = next(c for c in LOSSES if c.name == "huber-sum-2d")
    out, y = _problem(case)
    S = loss_hessian_factors(case.loss(), out, y)

    def no_vmap(*args, **kwargs):
        raise RuntimeError("vmap: no batching rule (simulated)")

    monkeypatch.setattr(loss_autodiff, "vmap", no_vmap)
    report_close(loss_hessian_factors(case.loss(), out, y), S, name="looped S")


# --- the closed forms are fast paths of the same factors ---------------------------
CLOSED_FORMS = [
    (nn.CrossEntropyLoss(), (N, 3), _classes),
    (nn.CrossEntropyLoss(reduction="sum"), (N, 3, 2), _classes),
    (nn.CrossEntropyLoss(), (N, 3), _binary),  # probability targets, unnormalised
    (nn.MSELoss(), (N, 2, 2), _real),
    (nn.BCEWithLogitsLoss(reduction="sum"), (N, 3), _binary),
]


@pytest.mark.parametrize(
    "loss, shape, targets",
    CLOSED_FORMS,
    ids=["ce", "ce-spatial-sum", "ce-probs", "mse", "bce"],
)
def test_closed_forms_agree_with_autodiff(loss, shape, targets):
    gen = torch.Generator().manual_seed(3)
    out = torch.randn(shape, generator=gen, dtype=D)
    y = targets(out, gen)
    assert resolve_loss(loss) is loss  # the closed form stays the fast path
    wrapped = AutodiffLoss(loss)
    S_auto = loss_hessian_factors(wrapped, out, y)
    report_close(
        _blocks(S_auto), _blocks(loss_hessian_factors(loss, out, y)), name="S Sᵀ"
    )
    assert wrapped.reduction == loss.reduction


# --- Monte-Carlo factors: Gaussian sketches ---------------------------------------
#: Entrywise z-score; with at most 2·N·O² = 360 entries a correct sampler fails with
#: probability below 360 · 2Φ(−5) ≈ 2e-4 under the CLT.
Z_ENTRY = 5.0


@pytest.mark.parametrize("name", ["huber-sum-2d", "gaussian-nll", "lambda-kl-logits"])
def test_sketches_are_unbiased_entrywise(name):
    """``M·s̃_m s̃_mᵀ`` averaged over ``M`` draws matches ``H_n`` within Z_ENTRY SE."""
    case = next(c for c in LOSSES if c.name == name)
    out, y = _problem(case)
    M = 4000
    S = sampled_loss_hessian_factors(case.loss(), out, y, M, _gen(1))
    S = S.flatten(2)  # [M, N, O]
    draws = M * torch.einsum("mno,mnp->mnop", S, S)  # one-draw estimates
    mean, se = draws.mean(0), draws.std(0) / M**0.5
    O = S.shape[-1]
    H = dense_output_hessian(case.loss(), out, y).reshape(N, O, N, O)
    H = torch.stack([H[n, :, n] for n in range(N)])  # [N, O, O]
    err = (mean - H).abs()
    assert (err <= Z_ENTRY * se + RTOL * H.abs().max()).all(), err.max()


def test_sketch_gram_is_exact_for_the_drawn_factors():
    """With the same seed, the engine's Gram is ``(Jᵀ S̃)ᵀ (Jᵀ S̃)`` (tuple targets)."""
    case = next(c for c in LOSSES if c.name == "gaussian-nll")
    model, loss, X, y = _model_problem(case)
    K = gram_matrix(model, loss, X, y, mc_samples=2, generator=_gen(5))
    out = dense_outputs(model, X)
    J = dense_jacobian(model, X).reshape(
        N, -1, sum(p.numel() for p in model.parameters())
    )
    S = sampled_loss_hessian_factors(loss, out, y, 2, _gen(5)).flatten(2)  # [M, N, O]
    V = torch.einsum("nod,mno->nmd", J, S).flatten(0, 1)  # rows sample-major [N·M, D]
    report_close(K, V @ V.T, name="MC Gram")


# --- end to end: spectra against the dense GGN ------------------------------------
def _model_problem(case: LossCase, bn: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    O = math.prod(case.out)
    layers = [nn.Linear(4, 5)] + ([nn.BatchNorm1d(5)] if bn else []) + [nn.Tanh()]
    layers += [nn.Linear(5, O), nn.Unflatten(1, case.out), case.head()]
    model = nn.Sequential(*layers).to(D)
    gen = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(N, 4, generator=gen, dtype=D)
    with torch.no_grad():
        out = model(X)
    return model, case.loss(), X, case.targets(out, gen)


@pytest.mark.parametrize("case", LOSSES, ids=repr)
def test_ggn_spectrum_matches_the_dense_ggn(case):
    model, loss, X, y = _model_problem(case)
    G = dense_ggn(model, loss, X, y)
    if case.zero:
        assert G.abs().max() == 0
        assert gram_matrix(model, loss, X, y).abs().max() == 0
        return
    assert_spectrum_matches(ggn_spectrum(model, loss, X, y).eigenvalues, G)


@pytest.mark.parametrize("name", ["huber", "gaussian-nll", "lambda-ce-positions"])
def test_train_mode_batch_norm(name):
    """BatchNorm with batch statistics: the full-batch path with autodiff factors."""
    model, loss, X, y = _model_problem(
        next(c for c in LOSSES if c.name == name), bn=True
    )
    res = ggn_spectrum(model, loss, X, y)
    assert res.path.name == "full_batch"
    assert_spectrum_matches(res.eigenvalues, dense_ggn(model, loss, X, y))
