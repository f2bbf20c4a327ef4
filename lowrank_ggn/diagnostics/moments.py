r"""Per-component gradients of the batch loss and their first two moments, streamed.

Write the batch loss as ``L = ρ Σ_n ℓ_n`` (``ρ`` from
:func:`lowrank_ggn.core.loss_factors.reduction_factor`: ``1/N`` for ``'mean'`` with one
output per sample, ``1/(N·P)`` for cross-entropy over ``P`` positions, where ``ℓ_n``
sums the positions, ``1`` for ``'sum'``). The **per-component gradients**

.. math::
    r_n = (J_θ F_n)^⊤ \frac{∂L}{∂F_n} ∈ ℝ^D, \qquad \sum_{n=1}^N r_n = ∇_θ L,

are the vector-Jacobian products of the batch function ``F(X, θ)`` with the cotangent
``e_n ⊗ ∂L/∂F_n``. If the forward pass processes samples independently,
``r_n = ρ ∇_θ ℓ(f(x_n, θ), y_n)`` and ``u_n = r_n / ρ`` is the *per-sample gradient*.
If it mixes samples (BatchNorm in train mode), ``r_n`` is the gradient through output
component ``F_n`` only; the rows still sum to ``∇_θ L``, but their moments are no
sampling statistics (see :mod:`lowrank_ggn.diagnostics.audit`; a
:class:`~lowrank_ggn.diagnostics.audit.SampleMixingWarning` says so).

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

Cost: ``N`` per-sample backward passes (vmapped) for a sample-independent model, ``N``
full-batch backward passes otherwise (the engine's path choice). Memory: ``chunk · D``
for the rows in flight; the ``[N, D]`` matrix exists only if ``per_component=True``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import grad, vjp, vmap

from lowrank_ggn.core.linearization import DEFAULT_CHUNK, Linearization, linearize
from lowrank_ggn.core.loss_factors import reduction_factor
from lowrank_ggn.core.paths import PER_SAMPLE, EnginePath
from lowrank_ggn.core.state import model_preserved
from lowrank_ggn.core.validation import check_chunk, check_model
from lowrank_ggn.diagnostics.audit import (
    locate_mixing_modules,
    per_component_explanation,
    warn_sample_mixing,
)


@dataclass
class GradientMoments:
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
        rho: ``ρ`` in ``L = ρ Σ_n ℓ_n``.
        sample_mixing: Whether the forward pass mixes samples (rows are then
            per-component, not per-sample, gradients).
        mixing_modules: Qualified names of the modules that mix samples.
        explanation: What the rows and their moments mean for this model.
        path: The engine's path (``per_sample`` or ``full_batch``).

    """

    mean: Tensor
    second_moment: Tensor
    variance: Tensor
    norms: Tensor
    snr: Tensor
    total_snr: Tensor
    gradient: Tensor
    per_component: Tensor | None
    rho: float
    sample_mixing: bool
    mixing_modules: tuple[str, ...]
    explanation: str
    path: EnginePath


def output_gradient(lin: Linearization) -> Tensor:
    """``∂L/∂F``, ``[N, *out]``, of the batch loss (reduction factor included)."""
    return grad(lambda o: lin.loss_func(o, lin.targets))(lin.outputs)


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
    if lin.path.name == PER_SAMPLE:
        theta = lin.fmodel.primals()

        def sample_grad(x: Tensor, w: Tensor) -> tuple[Tensor, ...]:
            _, fn = vjp(lambda th: lin.fmodel.single(th, x), theta)
            return fn(w)[0]

        for start in range(0, N, chunk):
            stop = min(N, start + chunk)
            blocks = vmap(sample_grad)(lin.inputs[start:stop], cotangents[start:stop])
            yield slice(start, stop), lin.fmodel.flatten(blocks, batch_dims=1)
        return
    for start in range(0, N, chunk):
        stop = min(N, start + chunk)
        # cotangent e_n ⊗ w_n for each n in the block: [B, N, *out]
        cot = cotangents.new_zeros(stop - start, *cotangents.shape)
        rows = torch.arange(stop - start, device=cot.device)
        cot[rows, rows + start] = cotangents[start:stop]
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


def gradient_moments(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Sequence[Tensor] | None = None,
    per_component: bool = False,
    chunk: int = DEFAULT_CHUNK,
    path: str | None = None,
) -> GradientMoments:
    r"""Per-component gradients ``r_n = J_θF_nᵀ ∂L/∂F_n`` and their moments.

    See the module docstring for the definitions (``u_n = r_n / ρ``, mean, second
    moment, population variance, norms, GSNR and total SNR). Issues one
    :class:`~lowrank_ggn.diagnostics.audit.SampleMixingWarning` if the forward pass mixes
    samples, naming the modules.

    Args:
        model: Module mapping ``inputs`` ``[N, *in]`` to ``[N, *out]``; never changed.
        loss_func: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss``
            (reduction ``'mean'`` or ``'sum'``).
        inputs: The batch.
        targets: Its targets.
        params: Parameters of ``model``; default: all that require grad. They define
            the flattening order.
        per_component: Also return the ``[N, D]`` matrix of the rows ``r_n``
            (memory ``N·D``); the moments never need it.
        chunk: Rows computed together (memory ``chunk · D``).
        path: ``None`` (automatic), ``"per_sample"`` or ``"full_batch"``.

    Returns:
        A :class:`GradientMoments`.

    Example:
        >>> import torch
        >>> from lowrank_ggn.reference import dense_gradient
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
        >>> loss = torch.nn.CrossEntropyLoss()
        >>> res = gradient_moments(model, loss, X, y, per_component=True)
        >>> res.per_component.shape, res.sample_mixing
        (torch.Size([5, 26]), False)
        >>> g = dense_gradient(model, loss, X, y)
        >>> assert torch.allclose(res.per_component.sum(0), g)
        >>> assert torch.allclose(res.mean, g / (res.rho * 5))

    """
    check_chunk(chunk)
    check_model(model)
    with model_preserved(model):
        lin = linearize(model, loss_func, inputs, targets, params, path)
        rho = reduction_factor(loss_func, lin.outputs)
        N, D = lin.batch_size, lin.fmodel.num_params
        g_out = output_gradient(lin)  # [N, *out]
        stats = _Moments(D, lin.fmodel.dtype, lin.fmodel.device)
        total = torch.zeros(D, dtype=lin.fmodel.dtype, device=lin.fmodel.device)
        norms = torch.zeros(N, dtype=lin.fmodel.dtype, device=lin.fmodel.device)
        rows_all = (
            torch.empty(N, D, dtype=lin.fmodel.dtype, device=lin.fmodel.device)
            if per_component
            else None
        )
        for samples, rows in component_gradient_blocks(lin, g_out, chunk):
            total += rows.sum(0)
            if rows_all is not None:
                rows_all[samples] = rows
            u = rows / rho
            norms[samples] = u.norm(dim=1)
            stats.update(u)
        mean = stats.mean
        variance = stats.m2 / N
        mixing = lin.path.sample_mixing
        modules = locate_mixing_modules(lin.fmodel, inputs) if mixing else ()
        result = GradientMoments(
            mean=mean,
            second_moment=stats.sum_sq / N,
            variance=variance,
            norms=norms,
            snr=mean.square() / variance,
            total_snr=mean.square().sum() / variance.sum(),
            gradient=total,
            per_component=rows_all,
            rho=rho,
            sample_mixing=mixing,
            mixing_modules=modules,
            explanation=per_component_explanation(mixing, modules),
            path=lin.path,
        )
    if mixing:
        warn_sample_mixing(
            modules,
            "gradient_moments returned per-component gradients",
            "the batch gradient",
        )
    return result
