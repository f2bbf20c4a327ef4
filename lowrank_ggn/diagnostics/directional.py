r"""First- and second-order directional derivatives per component, along directions.

For directions ``e_1, …, e_K ∈ ℝ^D`` (e.g. GGN eigenvectors from
:func:`lowrank_ggn.ggn_spectrum`) and ``L = ρ Σ_n ℓ_n`` (``ρ = 1/N`` for
``reduction='mean'``, 1 for ``'sum'``: the per-sample convention of
:mod:`lowrank_ggn.diagnostics.moments`):

.. math::
    γ_{nk} = e_k^⊤ u_n = \frac{(J_n e_k)^⊤ ∂L/∂F_n}{ρ},
    \qquad
    λ_{nk} = e_k^⊤ J_n^⊤ (∇²_{F_n} ℓ_n) J_n e_k = \frac{(J_n e_k)^⊤ (∇²_{F_n} L) J_n e_k}{ρ},

with ``J_n = J_θ F_n(X, θ)`` and ``u_n = J_nᵀ ∂L/∂F_n / ρ`` (see
:mod:`lowrank_ggn.diagnostics.moments`). Hence

.. math::
    ρ \sum_n γ_{nk} = e_k^⊤ ∇_θ L, \qquad ρ \sum_n λ_{nk} = e_k^⊤ G e_k .

**One Jacobian-vector product per direction** gives both, for all samples at once:
``J e_k = ∂F(X, θ)/∂θ · e_k`` is the JVP of the *batch* function, ``[N, *out]``, valid
when the forward pass mixes samples (BatchNorm in train mode) too, because row ``n``
of a full-batch JVP is ``J_n e_k`` whatever ``F_n`` depends on. It is computed from
the linearisation's graph by double backward
(:func:`lowrank_ggn.core.autodiff.graph_jvps`), so no forward pass runs. ``γ`` then
needs only the output gradient ``∂L/∂F`` and ``λ`` one Hessian-vector product of the
loss with respect to the outputs (block diagonal over samples for the supported
losses, so the per-sample quadratic forms are read off sample by sample). Cost: two
reverse passes per chunk of directions, no ``[N, D]`` matrix.

Statistics over the ``N`` components, per direction: ``mean``, population
``variance`` and ``snr = mean² / variance``. Without the SIMD structure these are
per-component, not per-sample quantities (a
:class:`~lowrank_ggn.diagnostics.warnings.SampleMixingWarning` says so).

Reference: Dangel, Tatzel & Hennig, *ViViT: Curvature access through the generalized
Gauss-Newton's low-rank structure*, TMLR 2022, https://arxiv.org/abs/2106.02624
(Section 3, directional derivatives).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, vjp, vmap

from lowrank_ggn.core.autodiff import reverse_jvps
from lowrank_ggn.core.linearization import DEFAULT_CHUNK, Linearization
from lowrank_ggn.core.loss_factors import sample_weight
from lowrank_ggn.core.spectrum import GGNSpectrum
from lowrank_ggn.diagnostics.moments import component_context, output_gradient
from lowrank_ggn.diagnostics.warnings import (
    PerComponentResult,
)


@dataclass
class DirectionalDerivatives(PerComponentResult):
    """Result of :func:`directional_derivatives`.

    Attributes:
        gammas: ``[N, K]``, ``γ_nk = e_kᵀ u_n``, first-order derivatives.
        lambdas: ``[N, K]``, ``λ_nk = e_kᵀ J_nᵀ ∇²ℓ_n J_n e_k``, curvatures.
        gamma_mean: ``[K]``, ``(1/N) Σ_n γ_nk``.
        gamma_variance: ``[K]``, population variance of ``γ_nk`` over ``n``.
        gamma_snr: ``[K]``, ``gamma_mean² / gamma_variance``.
        lambda_mean: ``[K]``, ``(1/N) Σ_n λ_nk``.
        lambda_variance: ``[K]``, population variance of ``λ_nk`` over ``n``.
        lambda_snr: ``[K]``, ``lambda_mean² / lambda_variance``.
        slopes: ``[K]``, ``ρ Σ_n γ_nk = e_kᵀ ∇_θ L``.
        curvatures: ``[K]``, ``ρ Σ_n λ_nk = e_kᵀ G e_k`` (the eigenvalue, for a GGN
            eigenvector).
        rho, sample_mixing, mixing_modules, explanation, path: see
            :class:`~lowrank_ggn.diagnostics.warnings.PerComponentResult`.

    """

    gammas: Tensor
    lambdas: Tensor
    gamma_mean: Tensor
    gamma_variance: Tensor
    gamma_snr: Tensor
    lambda_mean: Tensor
    lambda_variance: Tensor
    lambda_snr: Tensor
    slopes: Tensor
    curvatures: Tensor

    WHAT = "directional_derivatives returned per-component derivatives"
    SUMS_TO = "the batch slopes e_kᵀ∇L and curvatures e_kᵀGe_k (weighted by ρ)"


def resolve_directions(
    directions: Tensor | GGNSpectrum, num_params: int, ref: Tensor
) -> Tensor:
    """``directions`` as a ``[K, D]`` tensor, checked against the parameters ``ref``."""
    if isinstance(directions, GGNSpectrum):
        if directions.eigenvectors is None:
            raise ValueError(
                "directions is a GGNSpectrum without eigenvectors; call "
                "ggn_spectrum(..., eigenvectors=True)."
            )
        directions = directions.eigenvectors
    if not isinstance(directions, Tensor):
        raise TypeError(
            "directions must be a tensor [K, D] or a GGNSpectrum with eigenvectors; "
            f"got {type(directions).__name__}."
        )
    if directions.dim() == 1:
        directions = directions.unsqueeze(0)
    if directions.dim() != 2 or directions.shape[1] != num_params:
        raise ValueError(
            f"directions must have shape [K, D] with D = {num_params} (the number of "
            f"selected parameters, in params order); got {tuple(directions.shape)}."
        )
    if directions.dtype != ref.dtype or directions.device != ref.device:
        raise ValueError(
            f"directions have dtype {directions.dtype} on {directions.device} but the "
            f"parameters {ref.dtype} on {ref.device}; convert with "
            f"directions.to({ref.dtype}).to({str(ref.device)!r})."
        )
    if not torch.isfinite(directions).all():
        raise ValueError("directions contain NaN or Inf.")
    return directions.detach()


def output_jvps(lin: Linearization, directions: Tensor, chunk: int) -> Tensor:
    """``J e_k`` of the batch function for each direction: ``[K, D] -> [K, N, *out]``.

    Double backward on the recorded graph; for an operator without a double-backward
    formula (``nn.EmbeddingBag``), the rows of the batch Jacobian from the same graph
    (:func:`lowrank_ggn.core.autodiff.reverse_jvps`). No forward pass either way.
    """
    if lin.graph is None:
        lin.forward_with_graph()
    tangents = lin.fmodel.unflatten(directions)
    parts = [
        reverse_jvps(
            lin.graph, lin.fmodel.params, [t[i : i + chunk] for t in tangents], chunk
        )
        for i in range(0, directions.shape[0], max(1, chunk))
    ]
    return torch.cat(parts) if parts else directions.new_zeros(0, *lin.outputs.shape)


def _stats(values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, population variance and ``mean² / variance`` over dim 0."""
    mean = values.mean(0)
    variance = (values - mean).square().mean(0)
    return mean, variance, mean.square() / variance


def directional_from_linearization(
    lin: Linearization, directions: Tensor | GGNSpectrum, chunk: int = DEFAULT_CHUNK
) -> DirectionalDerivatives:
    r"""Per-component slopes ``γ_nk`` and curvatures ``λ_nk`` along ``directions``.

    See the module docstring for the definitions. The caller holds
    :func:`lowrank_ggn.core.state.model_preserved`; :meth:`DirectionalDerivatives.warn`
    issues the :class:`~lowrank_ggn.diagnostics.warnings.SampleMixingWarning`.

    Args:
        lin: The linearisation.
        directions: ``[K, D]`` (or ``[D]``), flattened in ``params`` order, or a
            :class:`~lowrank_ggn.core.spectrum.GGNSpectrum` with eigenvectors.
        chunk: Directions pushed forward together (memory ``chunk · N · Π out``).

    Returns:
        A :class:`DirectionalDerivatives`.
    """
    E = resolve_directions(directions, lin.fmodel.num_params, lin.fmodel.params[0])
    loss_func, targets = lin.loss_func, lin.targets
    rho = sample_weight(loss_func, lin.batch_size)
    N, K = lin.batch_size, E.shape[0]
    Je = output_jvps(lin, E, chunk)  # [K, N, *out]
    g_out = output_gradient(lin)  # [N, *out], reduction included
    O = lin.outputs[0].numel()  # explicit: K = 0 must reshape too
    gammas = (Je * g_out).reshape(K, N, O).sum(-1).T / rho  # [N, K]
    # ∇²_F L (J e_k): the loss Hessian is symmetric, so its VJP is the HVP
    _, hvp_fn = vjp(grad(lambda o: loss_func(o, targets)), lin.outputs)
    HJe = vmap(lambda v: hvp_fn(v)[0], chunk_size=max(1, chunk))(Je) if K else Je
    lambdas = (Je * HJe).reshape(K, N, O).sum(-1).T / rho  # [N, K]
    g_mean, g_var, g_snr = _stats(gammas)
    l_mean, l_var, l_snr = _stats(lambdas)
    return DirectionalDerivatives(
        gammas=gammas,
        lambdas=lambdas,
        gamma_mean=g_mean,
        gamma_variance=g_var,
        gamma_snr=g_snr,
        lambda_mean=l_mean,
        lambda_variance=l_var,
        lambda_snr=l_snr,
        slopes=rho * gammas.sum(0),
        curvatures=rho * lambdas.sum(0),
        **component_context(lin),
    )


__all__ = [
    "DirectionalDerivatives",
    "directional_from_linearization",
    "output_jvps",
    "resolve_directions",
]
