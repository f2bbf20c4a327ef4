r"""Damping policies: one damping ``δ_k`` per eigen-direction of a damped Newton step.

:class:`~lowrank_ggn.optim.DampedNewton` steps along the top-``K`` GGN eigenvectors
``e_k`` with the coefficients ``γ_k / (λ_k + δ_k)``. A policy chooses the dampings
``δ = [δ_1, …, δ_K]`` from what the step knows about the directions, a
:class:`DirectionalData`:

* ``eigenvalues`` ``λ_k`` ``[K]`` and ``eigenvectors`` ``e_k`` ``[K, D]``;
* ``slopes`` ``γ_k = e_kᵀ ∇_θ L`` ``[K]``;
* ``gammas`` ``γ_nk`` ``[N, K]`` and ``lambdas`` ``λ_nk`` ``[N_S, K]``, the per-sample
  (per-component, when the forward pass mixes samples) slopes and curvatures, with
  ``ρ Σ_n γ_nk = γ_k`` and ``ρ_S Σ_n λ_nk = λ_k`` (``ρ = 1/N`` for
  ``reduction='mean'``, 1 for ``'sum'``; ``N_S = N`` and ``ρ_S = ρ`` unless curvature
  sub-sampling keeps ``N_S`` samples).

``δ_k = inf`` means: no step along ``e_k``. Any callable ``policy(data) -> Tensor [K]``
with ``δ_k ≥ 0`` is a :class:`DampingPolicy`; it may keep state (a random generator)
and expose it through ``state_dict()``/``load_state_dict(state)``, which the optimiser's
own ``state_dict`` then includes.

**Bootstrap damping** (:class:`BootstrapDamping`) is the rule of ViViT's optimiser
experiments: Dangel, Tatzel & Hennig, *ViViT: Curvature access through the generalized
Gauss-Newton's low-rank structure*, TMLR 2022, https://arxiv.org/abs/2106.02624, code
``BootstrapDamping2`` in ``vivit/optim/damping.py`` of https://github.com/f-dangel/vivit,
with the settings of the paper's noisy-quadratic optimiser experiment
(``exp/exp03_noisy_quadratic/run.py`` of the experiments code published for review at
https://github.com/zv5dmjq5/vivit: grid ``logspace(-4, 2, 200)``, 100 resamples,
percentile 95).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from lowrank_ggn.core.loss_sampling import check_generator
from lowrank_ggn.diagnostics.warnings import SampleMixingWarning

#: ViViT experiments' grid: 200 log-spaced dampings from 1e-4 to 1e2.
DEFAULT_GRID = (-4.0, 2.0, 200)


@dataclass(frozen=True)
class DirectionalData:
    """What a damping policy receives about the ``K`` directions of one step.

    Attributes:
        eigenvalues: ``[K]``, ``λ_k``, descending.
        eigenvectors: ``[K, D]``, ``e_k``, orthonormal rows (parameters flattened in
            the optimiser's order).
        slopes: ``[K]``, ``γ_k = e_kᵀ ∇_θ L``.
        gammas: ``[N, K]``, ``γ_nk = e_kᵀ ∇_θ ℓ_n`` (per-component with sample mixing);
            ``rho · gammas.sum(0) = slopes``.
        lambdas: ``[N_S, K]``, ``λ_nk = e_kᵀ J_nᵀ ∇²ℓ_n J_n e_k`` of the factors in use
            (exact, Monte-Carlo or sub-sampled); ``lambda_rho · lambdas.sum(0) =
            eigenvalues``.
        rho: ``ρ`` of ``L = ρ Σ_n ℓ_n``.
        lambda_rho: ``ρ_S`` (``ρ`` unless sub-sampled: ``1/N_S`` for ``'mean'``).
        paired: Row ``n`` of ``gammas`` and of ``lambdas`` belong to the same sample.
        sample_mixing: The forward pass mixes samples: rows are per-component.
        mixing_modules: Names of the modules that mix samples.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    slopes: Tensor
    gammas: Tensor
    lambdas: Tensor
    rho: float
    lambda_rho: float
    paired: bool
    sample_mixing: bool = False
    mixing_modules: tuple[str, ...] = ()


@runtime_checkable
class DampingPolicy(Protocol):
    """A damping rule: ``policy(data) -> δ`` ``[K]``, ``δ_k ∈ [0, inf]``."""

    def __call__(self, data: DirectionalData) -> Tensor:
        """Return the damping of each direction, ``[K]`` (``inf``: do not step)."""
        ...


def check_nonnegative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float; got {type(value).__name__}.")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be ≥ 0 (inf allowed); got {value}.")
    return float(value)


class ConstantDamping:
    r"""The same damping ``δ`` along every direction: ``δ_k = δ``.

    Args:
        damping: ``δ ≥ 0``; ``inf`` takes no step along the eigenvectors.

    Example:
        >>> import torch
        >>> policy = ConstantDamping(0.1)
        >>> data = DirectionalData(torch.ones(3), torch.eye(3), torch.zeros(3),
        ...                        torch.zeros(4, 3), torch.ones(4, 3), 0.25, 0.25, True)
        >>> assert torch.equal(policy(data), torch.full((3,), 0.1))
    """

    def __init__(self, damping: float) -> None:
        self.damping = check_nonnegative("damping", damping)

    def __call__(self, data: DirectionalData) -> Tensor:
        """``δ`` for each of the ``K`` directions."""
        return torch.full_like(data.eigenvalues, self.damping)

    def __repr__(self) -> str:
        return f"ConstantDamping({self.damping:g})"


class BootstrapDamping:
    r"""Per-direction damping from bootstrapped gains (ViViT's optimiser experiments).

    Along direction ``k`` a damping ``δ`` takes the step ``τ_k(δ) = −γ_k / (λ_k + δ)``
    (learning rate 1), which decreases the quadratic model of the loss by the *gain*
    ``−γ_k τ − ½ λ_k τ²``. The rule asks how that gain varies when the batch is
    resampled. For each direction ``k`` and grid value ``δ ∈ Δ``:

    1. draw ``B`` bootstrap resamples ``i_b ∈ {1, …, N}^N`` (uniform, with
       replacement), the same for ``γ`` and ``λ`` (paired: ``γ_nk`` and ``λ_nk`` of a
       sample stay together; independent draws of ``N_S`` rows for ``λ`` under
       curvature sub-sampling) and the same for every ``δ``;
    2. resampled batch quantities ``γ̂_bk = ρ Σ_n γ_{i_bn,k}``,
       ``λ̂_bk = ρ_S Σ_n λ_{i_bn,k}``; the step ``τ_k(δ)`` is *not* resampled;
    3. gain samples ``g_bk(δ) = −γ̂_bk τ_k(δ) − ½ λ̂_bk τ_k(δ)²``;
    4. ``Q_k(δ)`` = the ``quantile``-quantile of ``g_bk(δ)`` over ``b``
       (``torch.quantile``, linear interpolation): the gain that a fraction
       ``1 − quantile`` of the resamples reaches;
    5. ``δ_k = argmax_{δ ∈ Δ: Q_k(δ) ≥ 0} Q_k(δ)`` (the first, i.e. smallest, of tied
       maxima), and ``δ_k = inf`` (no step along ``e_k``) if no ``δ`` has
       ``Q_k(δ) ≥ 0``.

    This is ``BootstrapDamping2`` of ViViT (https://github.com/f-dangel/vivit,
    ``vivit/optim/damping.py``; Dangel, Tatzel & Hennig, TMLR 2022,
    https://arxiv.org/abs/2106.02624) with its ``percentile = 100·(1 − quantile)``
    (95 ↔ 0.05), written with ``ρ`` so that ``'sum'`` losses scale as ``'mean'`` ones
    do (for ``'mean'``, ``ρ Σ_n`` is ViViT's mean over the batch). Without noise
    (every ``γ_nk`` and every ``λ_nk`` equal) the gain is largest for the smallest
    grid value: the undamped Newton step is optimal.

    **BatchNorm in train mode.** Then ``γ_nk`` and ``λ_nk`` are per-component
    quantities: the derivatives through output ``F_n`` of one forward pass whose batch
    statistics every sample shares, not the derivatives of independent per-sample
    losses. A resample re-weights these components with the statistics held at this
    batch's values, so ``Q_k(δ)`` measures how the gain depends on how the batch's
    outputs are weighted, not how it would vary over newly drawn batches (which would
    also change the statistics): a heuristic spread, not a confidence level. The
    first call on such data warns with a
    :class:`~lowrank_ggn.diagnostics.warnings.SampleMixingWarning` that says so (once
    per policy object, not at every step).

    Args:
        grid: The dampings ``Δ`` to choose from, 1-d, ``≥ 0``, finite (sorted here);
            default ``logspace(-4, 2, 200)``.
        resamples: ``B``, bootstrap resamples per direction (default 100).
        quantile: ``q ∈ [0, 1]`` of step 4 (default 0.05, ViViT's percentile 95).
        generator: ``torch.Generator`` for the resampling (default: a CPU generator
            of its own, seeded from the global RNG here, so that
            ``torch.manual_seed`` makes runs repeatable). Its state is part of
            :meth:`state_dict`, with or without a generator passed.

    Example:
        >>> import torch
        >>> gammas = torch.tensor([[1.0], [1.0], [1.0], [1.0]])  # no noise
        >>> data = DirectionalData(torch.ones(1), torch.eye(1), torch.ones(1),
        ...                        gammas, torch.ones(4, 1), 0.25, 0.25, True)
        >>> policy = BootstrapDamping(generator=torch.Generator().manual_seed(0))
        >>> print(f"{policy(data).item():.0e}")  # the smallest: undamped is best
        1e-04
    """

    def __init__(
        self,
        grid: Tensor | None = None,
        resamples: int = 100,
        quantile: float = 0.05,
        generator: torch.Generator | None = None,
    ) -> None:
        if grid is None:
            grid = torch.logspace(
                *DEFAULT_GRID[:2], DEFAULT_GRID[2], dtype=torch.float64
            )
        grid = torch.as_tensor(grid, dtype=torch.float64).detach().cpu()
        if grid.dim() != 1 or grid.numel() == 0:
            raise ValueError(
                f"grid must be a non-empty 1-d tensor of dampings; got shape "
                f"{tuple(grid.shape)}."
            )
        if not torch.isfinite(grid).all() or (grid < 0).any():
            raise ValueError(
                "grid must hold finite dampings ≥ 0 (no damping in the grid means "
                "inf, chosen automatically); got "
                f"min {grid.min().item():g}, max {grid.max().item():g}."
            )
        if isinstance(resamples, bool) or not isinstance(resamples, int):
            raise TypeError(
                f"resamples must be an int; got {type(resamples).__name__}."
            )
        if resamples < 1:
            raise ValueError(f"resamples must be ≥ 1; got {resamples}.")
        if isinstance(quantile, bool) or not isinstance(quantile, (int, float)):
            raise TypeError(f"quantile must be a float; got {type(quantile).__name__}.")
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(
                f"quantile must lie in [0, 1] (0.05: ViViT's percentile 95); got "
                f"{quantile}."
            )
        check_generator(generator)
        if generator is None:  # its own, so that state_dict can restore it
            seed = int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator().manual_seed(seed)
        self.grid = grid.sort().values
        self.resamples, self.quantile = resamples, float(quantile)
        self.generator = generator
        self._warned = False

    def _weights(self, rows: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Resample counts ``W[b, n]`` (how often row ``n`` is in resample ``b``)."""
        gen = self.generator
        idx = torch.randint(
            rows, (self.resamples, rows), generator=gen, device=gen.device
        ).to(device)
        counts = torch.zeros(self.resamples, rows, dtype=dtype, device=device)
        return counts.scatter_add_(1, idx, torch.ones_like(counts))

    def gain_quantiles(self, data: DirectionalData) -> Tensor:
        r"""``Q_k(δ)`` ``[K, len(grid)]``: the ``quantile`` of the bootstrapped gains.

        Steps 1–4 of the class docstring; draws from :attr:`generator`.
        """
        gammas, lambdas = data.gammas, data.lambdas
        dtype, device = gammas.dtype, gammas.device
        W = self._weights(gammas.shape[0], device, dtype)  # [B, N]
        Wl = W if data.paired else self._weights(lambdas.shape[0], device, dtype)
        g_hat = data.rho * (W @ gammas)  # [B, K], resampled batch slopes
        l_hat = data.lambda_rho * (Wl @ lambdas.to(dtype))  # [B, K], curvatures
        grid = self.grid.to(device=device, dtype=dtype)
        tau = -data.slopes[:, None] / (data.eigenvalues[:, None] + grid)  # [K, M]
        gains = -g_hat[..., None] * tau - 0.5 * l_hat[..., None] * tau.square()
        return torch.quantile(gains, self.quantile, dim=0)  # [B, K, M] -> [K, M]

    def __call__(self, data: DirectionalData) -> Tensor:
        """``δ_k`` per direction by the rule of the class docstring, ``[K]``."""
        if data.sample_mixing and not self._warned:
            self._warned = True  # once per policy: a training loop calls it each step
            where = (
                f"module(s) {', '.join(data.mixing_modules)} mix samples"
                if data.mixing_modules
                else "the forward pass mixes samples"
            )
            warnings.warn(
                f"BootstrapDamping resampled per-component slopes and curvatures: "
                f"{where} (BatchNorm in train mode), so γ_nk and λ_nk are derivatives "
                "through the outputs of one forward pass whose batch statistics all "
                "samples share, not independent per-sample terms. Resampling "
                "re-weights these components with the statistics held at this "
                "batch's values: the quantile of the gains is a heuristic spread, "
                "not a confidence level over newly drawn batches.",
                SampleMixingWarning,
                stacklevel=3,
            )
        K = data.eigenvalues.numel()
        if K == 0:
            return data.eigenvalues.new_zeros(0)
        Q = self.gain_quantiles(data)  # [K, M]
        qualifies = Q >= 0
        best = torch.where(qualifies, Q, -torch.inf).argmax(1)  # first maximum
        grid = self.grid.to(device=Q.device, dtype=Q.dtype)
        return torch.where(qualifies.any(1), grid[best], torch.inf)

    def state_dict(self) -> dict:
        """The generator's state."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the generator's state from :meth:`state_dict`."""
        if state.get("generator") is not None:
            self.generator.set_state(state["generator"])

    def __repr__(self) -> str:
        return (
            f"BootstrapDamping(grid=[{self.grid[0].item():g} … "
            f"{self.grid[-1].item():g}] ({self.grid.numel()}), "
            f"resamples={self.resamples}, quantile={self.quantile:g})"
        )


__all__ = [
    "BootstrapDamping",
    "ConstantDamping",
    "DampingPolicy",
    "DirectionalData",
]
