r"""Per-component gradients of the batch loss and their first two moments, streamed.

**Convention.** Write the batch loss as ``L = ρ Σ_n ℓ_n`` with ``ρ = 1/N`` for
``reduction='mean'`` and ``ρ = 1`` for ``'sum'``
(:func:`lowrank_ggn.core.loss_factors.sample_weight`), whatever the number of
outputs: ``ℓ_n`` is the loss of sample ``n`` reduced over its own outputs (or
positions) as the loss function reduces them. With ``'mean'`` the mean of the
per-sample gradients ``u_n = ∇_θ ℓ_n`` is the batch gradient, as for BackPACK's and
ViViT's individual gradients. The **per-component gradients**

.. math::
    r_n = (J_θ F_n)^⊤ \frac{∂L}{∂F_n} ∈ ℝ^D, \qquad \sum_{n=1}^N r_n = ∇_θ L,

are the vector-Jacobian products of the batch function ``F(X, θ)`` with the cotangent
``e_n ⊗ ∂L/∂F_n``. If the forward pass processes samples independently,
``r_n = ρ ∇_θ ℓ(f(x_n, θ), y_n)`` and ``u_n = r_n / ρ`` is the *per-sample gradient*.
If it mixes samples (BatchNorm in train mode), ``r_n`` is the gradient through output
component ``F_n`` only; the rows still sum to ``∇_θ L``, but their moments are no
sampling statistics (see :mod:`lowrank_ggn.diagnostics.audit`; a
:class:`~lowrank_ggn.diagnostics.warnings.SampleMixingWarning` says so).

Statistics, with ``u_n = r_n / ρ`` and all products elementwise:

* ``mean = (1/N) Σ_n u_n``, ``second_moment = (1/N) Σ_n u_n²``,
  ``variance = second_moment − mean²`` (population variance, accumulated with Chan's
  pairwise update so that it is never negative through cancellation);
* ``norms[n] = ‖u_n‖₂``;
* ``snr = mean² / variance`` per parameter, the gradient signal-to-noise ratio (GSNR)
  of Liu et al., *Understanding why neural networks generalize well through GSNR of
  parameters*, ICLR 2020, https://arxiv.org/abs/2001.07384 (``inf`` where the variance
  vanishes and the mean does not, ``nan`` where both vanish);
* ``total_snr = ‖mean‖² / Σ_d variance_d``, the inverse of the "simple noise scale"
  ``B_simple = tr Σ / ‖G‖²`` of McCandlish et al., *An empirical model of large-batch
  training*, 2018, https://arxiv.org/abs/1812.06162.

Cost: ``N`` per-sample backward passes (vmapped: one forward pass over the batch) for
a sample-independent model, ``N`` full-batch backward passes of the linearisation's
graph otherwise (the engine's path choice; no forward pass). Memory: ``chunk · D``
for the rows in flight; the ``[N, D]`` matrix exists only if ``per_component=True``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad

from lowrank_ggn.core.autodiff import one_hot_cotangents, per_sample_vjps
from lowrank_ggn.core.linearization import DEFAULT_CHUNK, Linearization
from lowrank_ggn.core.loss_factors import sample_weight
from lowrank_ggn.core.paths import PER_SAMPLE
from lowrank_ggn.diagnostics.probe import locate_mixing_modules
from lowrank_ggn.diagnostics.warnings import (
    PerComponentResult,
    per_component_explanation,
)


@dataclass
class GradientMoments(PerComponentResult):
    """Result of :func:`gradient_moments`; vectors are flattened in ``params`` order.

    Attributes:
        mean: ``[D]``, ``(1/N) Σ_n u_n`` with ``u_n = r_n / ρ``.
        second_moment: ``[D]``, ``(1/N) Σ_n u_n²``.
        variance: ``[D]``, ``second_moment − mean²`` (population, elementwise).
        norms: ``[N]``, ``‖u_n‖₂``.
        snr: ``[D]``, ``mean² / variance`` (GSNR).
        total_snr: ``‖mean‖² / Σ variance`` (inverse simple noise scale).
        gradient: ``[D]``, ``Σ_n r_n = ∇_θ L``.
        per_component: ``[N, D]``, rows ``r_n = J_θF_nᵀ ∂L/∂F_n``; ``None`` unless
            asked for.
        rho, sample_mixing, mixing_modules, explanation, path: see
            :class:`~lowrank_ggn.diagnostics.warnings.PerComponentResult`.

    """

    mean: Tensor
    second_moment: Tensor
    variance: Tensor
    norms: Tensor
    snr: Tensor
    total_snr: Tensor
    gradient: Tensor
    per_component: Tensor | None

    WHAT = "gradient_moments returned per-component gradients"
    SUMS_TO = "the batch gradient"


def mixing_modules(lin: Linearization) -> tuple[str, ...]:
    """Modules that mix samples (kept by ``lin``): the module scan, else the probe.

    The path check's module scan names every BatchNorm that uses batch statistics;
    only when it found none but the numerical check saw mixing does the input
    probe (:func:`lowrank_ggn.diagnostics.probe.locate_mixing_modules`) run.
    """
    return lin.located_mixing(locate_mixing_modules)


def output_gradient(lin: Linearization) -> Tensor:
    """``∂L/∂F``, ``[N, *out]``, of the batch loss (reduction factor included)."""
    return grad(lambda o: lin.loss_func(o, lin.targets))(lin.outputs)


def batch_gradient(lin: Linearization) -> Tensor:
    """``∇_θ L`` ``[D]``: one backward pass of the linearisation's graph."""
    return lin.vjp(output_gradient(lin).unsqueeze(0))[0]


def component_gradient_blocks(
    lin: Linearization, cotangents: Tensor, chunk: int = DEFAULT_CHUNK
) -> Iterator[tuple[slice, Tensor]]:
    r"""Yield ``(samples, rows)`` with ``rows[i] = J_θF_nᵀ w_n`` for ``n`` in ``samples``.

    Args:
        lin: The linearisation.
        cotangents: ``W = [w_1, …, w_N]``, ``[N, *out]``.
        chunk: Rows per block.

    Yields:
        A slice of samples and the ``[B, D]`` block of their rows. On the per-sample
        path, a vmapped per-sample vector-Jacobian product; on the full-batch path,
        the full-batch product with the cotangent ``e_n ⊗ w_n`` for each ``n``.

    """
    N = lin.batch_size
    for start in range(0, N, chunk):
        stop = min(N, start + chunk)
        if lin.path.name == PER_SAMPLE:
            blocks = per_sample_vjps(
                lin.fmodel, lin.inputs[start:stop], cotangents[start:stop]
            )
            yield slice(start, stop), lin.fmodel.flatten(blocks, batch_dims=1)
        else:
            cot = one_hot_cotangents(cotangents[start:stop], start, N)
            yield slice(start, stop), lin.vjp(cot, chunk)


class _Moments:
    """Streaming mean, second moment and population variance over rows (Chan et al.)."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.count = 0
        self.mean = torch.zeros(dim, dtype=dtype, device=device)
        self.m2 = torch.zeros_like(self.mean)  # Σ (u − mean)²
        self.sum_sq = torch.zeros_like(self.mean)

    def update(self, rows: Tensor) -> None:
        n_b = rows.shape[0]
        if n_b == 0:
            return
        mean_b = rows.mean(0)
        m2_b = (rows - mean_b).square().sum(0)
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (self.count * n_b / n)
        self.sum_sq = self.sum_sq + rows.square().sum(0)
        self.count = n


def moments_from_linearization(
    lin: Linearization, chunk: int = DEFAULT_CHUNK, per_component: bool = False
) -> GradientMoments:
    r"""Per-component gradients ``r_n = J_θF_nᵀ ∂L/∂F_n`` and their moments.

    See the module docstring for the definitions (``u_n = r_n / ρ``, mean, second
    moment, population variance, norms, GSNR and total SNR). The caller holds
    :func:`lowrank_ggn.core.state.model_preserved`; :meth:`GradientMoments.warn`
    issues the :class:`~lowrank_ggn.diagnostics.warnings.SampleMixingWarning`.

    Args:
        lin: The linearisation.
        chunk: Rows computed together (memory ``chunk · D``).
        per_component: Also return the ``[N, D]`` matrix of the rows ``r_n``.

    Returns:
        A :class:`GradientMoments`.
    """
    rho = sample_weight(lin.loss_func, lin.batch_size)
    N, D = lin.batch_size, lin.fmodel.num_params
    dtype, device = lin.fmodel.dtype, lin.fmodel.device
    g_out = output_gradient(lin)  # [N, *out]
    stats = _Moments(D, dtype, device)
    total = torch.zeros(D, dtype=dtype, device=device)
    norms = torch.zeros(N, dtype=dtype, device=device)
    rows_all = torch.empty(N, D, dtype=dtype, device=device) if per_component else None
    for samples, rows in component_gradient_blocks(lin, g_out, chunk):
        total += rows.sum(0)
        if rows_all is not None:
            rows_all[samples] = rows
        u = rows / rho
        norms[samples] = u.norm(dim=1)
        stats.update(u)
    mean, variance = stats.mean, stats.m2 / N
    return GradientMoments(
        mean=mean,
        second_moment=stats.sum_sq / N,
        variance=variance,
        norms=norms,
        snr=mean.square() / variance,
        total_snr=mean.square().sum() / variance.sum(),
        gradient=total,
        per_component=rows_all,
        **component_context(lin),
    )


def component_context(lin: Linearization) -> dict:
    """The fields every per-component result shares: ``rho``, mixing, explanation, path."""
    modules, mixing = mixing_modules(lin), lin.path.sample_mixing
    return dict(
        rho=sample_weight(lin.loss_func, lin.batch_size),
        sample_mixing=mixing,
        mixing_modules=modules,
        explanation=per_component_explanation(mixing, modules),
        path=lin.path,
    )


__all__ = [
    "component_context",
    "GradientMoments",
    "batch_gradient",
    "component_gradient_blocks",
    "moments_from_linearization",
    "output_gradient",
]
