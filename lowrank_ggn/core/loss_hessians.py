r"""Per-sample loss Hessians and their square roots, for any :class:`AutodiffLoss`.

For a loss with the per-sample-plus-reduction structure ``L(F) = ρ Σ_n ℓ_n(F_n)``
(checked by :func:`lowrank_ggn.core.losses.autodiff.check_structure`, which fixes
``ρ ∈ {1/N, 1}``), ``∇²_F L`` is block diagonal with blocks

.. math::
    H_n = ρ\, ∇²ℓ_n(F_n) ∈ ℝ^{O × O},\qquad O = Π\,\text{out}.

**Hessians** (:func:`per_sample_hessians`): ``H_n`` from ``vmap`` over samples of
``jacrev(grad(ℓ_n))`` (reverse over reverse; a loop over samples with plain autograd
rows where ``vmap`` cannot run the loss, e.g. ``GaussianNLLLoss``'s data-dependent
check of ``var``), scaled by ``ρ`` and symmetrised, ``H_n ← (H_n + H_nᵀ)/2``. They
take ``N·O²`` entries, checked against :mod:`lowrank_ggn.core.budget` before any is
computed.

**Square roots** (:func:`factors_from_hessians`): ``H_n = U_n Λ_n U_nᵀ`` by
``eigh``, eigenvalues sorted descending. With ``λ_max = max_{n,k} |λ_nk|`` and
``τ = roundoff_rtol`` of the dtype (:mod:`lowrank_ggn.core.tolerances`):

* an eigenvalue below ``−τ λ_max`` is refused: the loss is not convex in the outputs
  and the GGN is not PSD;
* the others are clamped at 0, and those at most ``τ λ_max`` are dropped, keeping the
  rank

.. math::
    s_{nc} = \sqrt{λ_{nc}}\, u_{nc},\qquad c = 1, …, C,\qquad
    C = \max(1, \max_n \#\{k : λ_{nk} > τ λ_{\max}\}),

the top-``C`` eigenpairs of each sample (zero columns for samples of lower rank), so
``Σ_c s_nc s_ncᵀ = H_n`` up to ``τ λ_max``. Cost: ``O(N·O²)`` memory, ``O(N·O)``
backward passes of the loss (vmapped) and ``O(N·O³)`` for ``eigh``: meant for losses
with few outputs per sample.

**Monte-Carlo factors** (:func:`gaussian_sketch`): ``s̃_nm = S_n z_nm / √M`` with
``S_n = [s_n1, …, s_nC]`` ``[O, C]`` and ``z_nm ~ N(0, I_C)`` independent over ``n``
and ``m``, so that the sketch is unbiased,

.. math::
    E\Big[\sum_{m=1}^M s̃_{nm} s̃_{nm}^⊤\Big] = S_n E[z z^⊤] S_n^⊤ = H_n .

Each ``s̃_nm ~ N(0, H_n / M)`` exactly, whatever eigenbasis and signs ``eigh``
returned.

Reference: Dangel, Tatzel & Hennig, *ViViT: Curvature access through the generalized
Gauss-Newton's low-rank structure*, TMLR 2022, https://arxiv.org/abs/2106.02624.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, jacrev

from lowrank_ggn.core.budget import check_memory
from lowrank_ggn.core.losses.autodiff import (
    AutodiffLoss,
    _per_sample,
    _targets_view,
    call_loss,
    loss_name,
    sample_weight_of,
)
from lowrank_ggn.core.tolerances import roundoff_rtol


def _hessian_rows(loss: Callable, F: Tensor, y: object) -> Tensor:
    """``∇²ℓ`` ``[1, O, O]`` of ``ℓ = loss(F, y)`` for a batch of one, by autograd rows."""
    O = F[0].numel()
    with torch.enable_grad():
        F = F.detach().requires_grad_(True)
        value, g = call_loss(loss, F, y), None
        if value.requires_grad:
            (g,) = torch.autograd.grad(value, F, create_graph=True, allow_unused=True)
        H = F.new_zeros(O, O)
        if g is not None and g.requires_grad:
            g = g.flatten()
            for i in range(O):
                (row,) = torch.autograd.grad(
                    g[i], F, retain_graph=True, allow_unused=True
                )
                if row is not None:
                    H[i] = row.flatten()
    return H.unsqueeze(0)


def per_sample_hessians(
    loss: AutodiffLoss,
    outputs: Tensor,
    targets: object,
    memory_budget: float | None = None,
) -> Tensor:
    """``H_n = ρ ∇²ℓ_n(F_n)``, ``[N, O, O]``, symmetrised (``ρ`` from ``loss.reduction``)."""
    N, O = outputs.shape[0], outputs[0].numel()
    check_memory(
        {f"per-sample loss Hessians [N={N}, O={O}, O={O}]": N * O * O},
        outputs.element_size(),
        memory_budget,
        "Autodiff loss factors hold one [O, O] Hessian per sample: use a smaller "
        "batch or fewer outputs per sample. ",
    )
    outputs = outputs.detach()
    view = _targets_view(targets, N)

    def hess(f: Tensor, y: object) -> tuple[Tensor]:
        def ell(x: Tensor) -> Tensor:
            return call_loss(loss.loss, x.unsqueeze(0), y).reshape(())

        return (jacrev(grad(ell))(f).reshape(O, O),)

    def looped(F: Tensor, y: object) -> tuple[Tensor]:
        return (_hessian_rows(loss.loss, F, y),)

    (H,) = _per_sample(hess, looped, outputs, (), view)
    H = sample_weight_of(loss.reduction, N) * H
    return 0.5 * (H + H.transpose(1, 2))


def factors_from_hessians(H: Tensor, name: str = "loss_func") -> Tensor:
    """Columns ``s_nc = √λ_nc u_nc`` of ``H`` ``[N, O, O]``, as ``[C, N, O]``.

    Raises:
        ValueError: If an eigenvalue lies below ``−τ λ_max`` (not PSD).

    Example:
        >>> import torch
        >>> H = torch.diag_embed(torch.tensor([[2.0, 0.0], [1.0, 3.0]], dtype=torch.float64))
        >>> S = factors_from_hessians(H)
        >>> assert torch.allclose(torch.einsum("cnk,cnl->nkl", S, S), H)
    """
    lam, U = torch.linalg.eigh(H)  # ascending, [N, O], [N, O, O]
    lam, U = lam.flip(-1), U.flip(-1)  # descending
    tol = roundoff_rtol(H.dtype)
    scale = lam.abs().max().item() if lam.numel() else 0.0
    low = lam[:, -1].min().item() if lam.numel() else 0.0
    if low < -tol * scale:
        n = int(lam[:, -1].argmin())
        raise ValueError(
            f"{name} has a per-sample Hessian that is not positive semi-definite: "
            f"sample {n} has eigenvalue {low:.3e} (largest |eigenvalue| {scale:.3e}, "
            f"round-off tolerance {tol:g}·{scale:.3e}). The GGN needs a loss that is "
            "convex in the model outputs (at these outputs); move the non-convex part "
            "into the model, or use a convex loss."
        )
    keep = lam > tol * scale  # [N, O]
    C = max(1, int(keep.sum(-1).max()))
    root = torch.where(keep, lam, torch.zeros_like(lam)).sqrt()[:, :C]  # [N, C]
    S = U[:, :, :C] * root.unsqueeze(1)  # [N, O, C]
    return S.permute(2, 0, 1)


def autodiff_hessian_factors(
    loss: AutodiffLoss,
    outputs: Tensor,
    targets: object,
    memory_budget: float | None = None,
) -> Tensor:
    r"""Factors ``S`` ``[C, N, *out]`` with ``Σ_c S[c, n] S[c, n]ᵀ = ρ ∇²ℓ_n``.

    Assumes :func:`~lowrank_ggn.core.losses.autodiff.check_structure` has passed for
    these tensors (it fixes ``ρ``). ``C`` is the largest numerical rank of the
    per-sample Hessians (module docstring), at most ``O``.
    """
    H = per_sample_hessians(loss, outputs, targets, memory_budget)
    S = factors_from_hessians(H, f"loss_func {loss_name(loss)}")
    return S.reshape(S.shape[0], *outputs.shape)


def gaussian_sketch(
    factors: Tensor, mc_samples: int, generator: torch.Generator | None = None
) -> Tensor:
    r"""``S̃[m, n] = Σ_c z_nmc S[c, n] / √M`` with ``z_nm ~ N(0, I_C)``: ``[M, N, *out]``.

    Unbiased: ``E[Σ_m S̃[m, n] S̃[m, n]ᵀ] = Σ_c S[c, n] S[c, n]ᵀ``. Draws come from
    ``generator`` (on its device, in the factors' dtype, shape ``[M, N, C]``), else
    from the default generator of the factors' device.

    Example:
        >>> import torch
        >>> S = torch.randn(2, 3, 4, dtype=torch.float64)
        >>> assert gaussian_sketch(S, 5, torch.Generator().manual_seed(0)).shape == (5, 3, 4)
    """
    C, N = factors.shape[:2]
    device = factors.device if generator is None else generator.device
    z = torch.randn(
        (mc_samples, N, C), generator=generator, dtype=factors.dtype, device=device
    ).to(factors.device)
    # [M, N, C] x [C, N, O] -> [M, N, O]
    sketch = torch.einsum("mnc,cno->mno", z, factors.reshape(C, N, -1))
    return (sketch / math.sqrt(mc_samples)).reshape(mc_samples, *factors.shape[1:])


__all__ = [
    "autodiff_hessian_factors",
    "factors_from_hessians",
    "gaussian_sketch",
    "per_sample_hessians",
]
