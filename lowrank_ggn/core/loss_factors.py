r"""Symmetric square roots of the loss Hessian with respect to the model outputs.

For a loss with the (SIMD + reduction) structure

.. math::
    L(F) = ρ \sum_{n=1}^N ℓ(F_n, y_n),

the Hessian ``∇²_F L`` is block diagonal over samples. This module returns factors
``S`` with ``C`` columns per sample such that

.. math::
    ∇²_{F_n} L = ρ ∇²_{F_n} ℓ_n = \sum_{c=1}^C s_{nc} s_{nc}^⊤ .

The reduction factor ``ρ`` is folded into ``S`` (a factor ``√ρ``), exactly as PyTorch
defines it:

=====================  ======================================  =========  ======================
loss                   per-sample output ``F_n``               ``C``      ``ρ`` for ``'mean'``
=====================  ======================================  =========  ======================
``CrossEntropyLoss``   ``[K]`` or ``[K, d_1, …]`` (``P = Πd``)  ``K·P``    ``1 / (N·P)``
``MSELoss``            any ``[*out]``                          ``Π out``  ``1 / (N·Π out)``
``BCEWithLogitsLoss``  any ``[*out]``                          ``Π out``  ``1 / (N·Π out)``
=====================  ======================================  =========  ======================

``ρ = 1`` for ``'sum'``. The closed forms are

* cross-entropy, per position: ``∇²ℓ = w (diag p − p pᵀ)`` with ``p = softmax(F_n)`` and
  ``w = Σ_k y_k`` (``w = 1`` for class-index targets); square root
  ``√w (diag √p − p √pᵀ)``, exact because ``Σ_k p_k = 1``;
* squared error: ``∇²ℓ = 2 I``, square root ``√2 I``;
* binary cross-entropy with logits: ``∇²ℓ = diag σ(F)(1 − σ(F))``.

Reference: Dangel, Tatzel & Hennig, *ViViT: Curvature access through the generalized
Gauss-Newton's low-rank structure*, TMLR 2022, https://arxiv.org/abs/2106.02624.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

SUPPORTED_LOSSES = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)


def check_loss_func(loss_func: nn.Module) -> None:
    """Raise if ``loss_func`` is not a loss whose Hessian factors we compute exactly.

    Raises:
        NotImplementedError: For an unknown loss type or an unsupported option
            (``reduction='none'``, class weights, label smoothing, ``pos_weight``).
        TypeError: If ``loss_func`` is not an ``nn.Module``.

    """
    names = ", ".join(c.__name__ for c in SUPPORTED_LOSSES)
    if not isinstance(loss_func, nn.Module):
        raise TypeError(
            f"loss_func must be a torch.nn loss module instance ({names}); "
            f"got {type(loss_func).__name__}. Pass e.g. torch.nn.CrossEntropyLoss()."
        )
    if type(loss_func) not in SUPPORTED_LOSSES:
        raise NotImplementedError(
            f"loss_func of type {type(loss_func).__name__} is not supported; "
            f"supported are {names} (exact types, not subclasses)."
        )
    reduction = loss_func.reduction
    if reduction not in ("mean", "sum"):
        raise NotImplementedError(
            f"loss_func.reduction={reduction!r} is not supported: the GGN needs a "
            "scalar loss. Use reduction='mean' or 'sum'."
        )
    if getattr(loss_func, "weight", None) is not None:
        raise NotImplementedError(
            f"{type(loss_func).__name__}(weight=...) is not supported; "
            "construct the loss without class/element weights."
        )
    if getattr(loss_func, "pos_weight", None) is not None:
        raise NotImplementedError(
            "BCEWithLogitsLoss(pos_weight=...) is not supported; "
            "construct the loss without pos_weight."
        )
    if getattr(loss_func, "label_smoothing", 0.0) != 0.0:
        raise NotImplementedError(
            f"CrossEntropyLoss(label_smoothing={loss_func.label_smoothing}) is not "
            "supported; use label_smoothing=0.0."
        )


def resolve_loss(loss_func: object) -> nn.Module:
    """The loss as the engine uses it (closed-form losses are returned unchanged)."""
    return loss_func


def num_factor_columns(loss_func: nn.Module, output_shape: torch.Size) -> int:
    """``C``, the number of factor columns per sample for outputs ``[N, *out]``."""
    return math.prod(output_shape[1:])


def reduction_factor(loss_func: nn.Module, outputs: Tensor) -> float:
    """``ρ`` in ``L = ρ Σ_n ℓ_n`` (for CE with spatial dims, ``ℓ_n`` sums positions)."""
    if loss_func.reduction == "sum":
        return 1.0
    if isinstance(loss_func, nn.CrossEntropyLoss):
        return 1.0 / (outputs.shape[0] * math.prod(outputs.shape[2:]))
    return 1.0 / outputs.numel()


def sample_weight(loss_func: nn.Module, batch_size: int) -> float:
    r"""``ρ`` in ``L = ρ Σ_n ℓ_n`` for per-sample quantities: ``1/N`` or 1.

    The per-sample convention of :mod:`lowrank_ggn.diagnostics`: with
    ``reduction='mean'`` the per-sample losses ``ℓ_n`` are reduced over their own
    outputs (or positions) as the loss reduces them, so that ``L = (1/N) Σ_n ℓ_n``
    and the mean of the per-sample gradients is the batch gradient (BackPACK's and
    ViViT's individual gradients); with ``'sum'``, ``L = Σ_n ℓ_n``.
    """
    return 1.0 if loss_func.reduction == "sum" else 1.0 / batch_size


def check_targets(loss_func: nn.Module, outputs: Tensor, targets: Tensor) -> None:
    """Raise a ``ValueError`` if ``targets`` do not fit ``outputs`` for this loss.

    Args:
        loss_func: A supported loss (see :func:`check_loss_func`).
        outputs: Model outputs ``[N, *out]``.
        targets: Targets for the batch.

    """
    name = type(loss_func).__name__
    if not isinstance(outputs, Tensor) or not outputs.is_floating_point():
        raise TypeError(
            "outputs must be a floating-point torch.Tensor [N, *out]; got "
            f"{getattr(outputs, 'dtype', type(outputs).__name__)}."
        )
    if outputs.dim() == 0 or outputs.shape[0] == 0:
        raise ValueError(
            f"outputs must hold at least one sample in dim 0; got shape "
            f"{tuple(outputs.shape)}."
        )
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor; got {type(targets).__name__}")
    if targets.device != outputs.device:
        raise ValueError(
            f"targets are on {targets.device} but the outputs on {outputs.device}; "
            f"move them with targets.to({str(outputs.device)!r})."
        )
    if not torch.isfinite(outputs).all():
        raise ValueError("outputs contain NaN or Inf; the loss Hessian is undefined.")
    if targets.is_floating_point() and not torch.isfinite(targets).all():
        raise ValueError(
            "targets contain NaN or Inf; clean the batch first (torch.isfinite)."
        )
    if targets.shape[:1] != outputs.shape[:1]:
        raise ValueError(
            f"targets have batch size {targets.shape[0] if targets.dim() else 'none'} "
            f"but the model outputs have batch size {outputs.shape[0]}; pass one "
            "target per input sample."
        )
    if isinstance(loss_func, nn.CrossEntropyLoss):
        if outputs.dim() < 2:
            raise ValueError(
                f"{name} needs outputs [N, K, ...] with a class dimension; got model "
                f"outputs of shape {tuple(outputs.shape)}."
            )
        K = outputs.shape[1]
        if targets.is_floating_point():
            if targets.shape != outputs.shape:
                raise ValueError(
                    f"{name} with probability targets needs targets of the output "
                    f"shape {tuple(outputs.shape)}; got {tuple(targets.shape)}."
                )
            if (targets < 0).any():
                raise ValueError(
                    f"{name} probability targets must be non-negative, else the loss "
                    "Hessian is not positive semi-definite; got a negative entry."
                )
            return
        if targets.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16):
            raise TypeError(
                f"{name} targets must be class indices (integer dtype) or class "
                f"probabilities (floating dtype); got dtype {targets.dtype}."
            )
        expected = outputs.shape[:1] + outputs.shape[2:]
        if targets.shape != expected:
            raise ValueError(
                f"{name} class-index targets must have shape {tuple(expected)} for "
                f"outputs {tuple(outputs.shape)}; got {tuple(targets.shape)}."
            )
        if (targets == loss_func.ignore_index).any():
            raise NotImplementedError(
                f"targets contain ignore_index={loss_func.ignore_index}; ignored "
                "targets are not supported. Drop those samples from the batch."
            )
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= K:
            raise ValueError(
                f"targets must lie in [0, {K}) for {name} with {K} classes; got "
                f"values in [{lo}, {hi}]."
            )
        return
    if targets.shape != outputs.shape:
        raise ValueError(
            f"{name} needs targets of the output shape {tuple(outputs.shape)}; got "
            f"{tuple(targets.shape)}. (Broadcasting is not supported.)"
        )
    if not targets.is_floating_point():
        raise TypeError(f"{name} targets must be floating point; got {targets.dtype}.")


def _softmax_sqrt(probs: Tensor) -> Tensor:
    """``diag √p − p √pᵀ`` along dim 1 of ``probs`` ``[N, K, *pos]``.

    Returns:
        ``[N, K_row, K_col, *pos]``; column ``k`` is ``√p_k (e_k − p)``.

    """
    K = probs.shape[1]
    sqrt_p = probs.sqrt()
    eye = torch.eye(K, dtype=probs.dtype, device=probs.device)
    eye = eye.reshape(1, K, K, *([1] * (probs.dim() - 2)))
    # [N, K_row, 1, *pos] * [N, 1, K_col, *pos]
    return (eye - probs.unsqueeze(2)) * sqrt_p.unsqueeze(1)


def loss_hessian_factors(
    loss_func: nn.Module, outputs: Tensor, targets: Tensor
) -> Tensor:
    r"""Factors ``S`` with ``∇²_F L = Σ_c S[c] ⊗ S[c]`` per sample, reduction included.

    Args:
        loss_func: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss`` with
            ``reduction`` ``'mean'`` or ``'sum'``.
        outputs: Model outputs ``[N, *out]``; only their values are used.
        targets: Targets, checked by :func:`check_targets`.

    Returns:
        ``S`` of shape ``[C, N, *out]``. For every sample ``n``,
        ``Σ_c S[c, n] S[c, n]ᵀ = ∇²_{F_n} L`` (flattened over ``*out``), and
        ``S[c, m] = 0`` never couples samples: the Hessian is block diagonal.

    Example:
        >>> import torch
        >>> out = torch.randn(4, 3, dtype=torch.float64)
        >>> S = loss_hessian_factors(torch.nn.MSELoss(reduction="sum"), out, out)
        >>> assert torch.allclose(torch.einsum("cnk,cnl->nkl", S, S)[0], 2 * torch.eye(3, dtype=out.dtype))

    """
    check_loss_func(loss_func)
    check_targets(loss_func, outputs, targets)
    outputs = outputs.detach()
    rho = reduction_factor(loss_func, outputs)
    N, out_shape = outputs.shape[0], outputs.shape[1:]

    if isinstance(loss_func, nn.CrossEntropyLoss):
        probs = outputs.softmax(dim=1)  # [N, K, *pos]
        weight = rho * (targets.sum(1) if targets.is_floating_point() else 1.0)
        root = _softmax_sqrt(probs)  # [N, K_row, K_col, *pos]
        if isinstance(weight, Tensor):  # [N, *pos]
            root = root * weight.sqrt().unsqueeze(1).unsqueeze(1)
        else:
            root = root * math.sqrt(weight)
        K, pos = outputs.shape[1], outputs.shape[2:]
        P = math.prod(pos)
        root = root.reshape(N, K, K, P)
        # columns (k, q) act on position q only: S[(k, q), n, :, q'] = δ_{qq'} root[n, :, k, q]
        eye_p = torch.eye(P, dtype=outputs.dtype, device=outputs.device)
        S = torch.einsum("nrkq,qs->kqnrs", root, eye_p)
        return S.reshape(K * P, N, K, *pos)

    C = math.prod(out_shape)
    if isinstance(loss_func, nn.MSELoss):
        diag = torch.full_like(outputs, math.sqrt(2.0 * rho)).reshape(N, C)
    else:  # BCEWithLogitsLoss
        # σ(x)(1 − σ(x)) = σ(x) σ(−x), accurate for large |x|
        diag = (rho * outputs.sigmoid() * (-outputs).sigmoid()).sqrt().reshape(N, C)
    eye = torch.eye(C, dtype=outputs.dtype, device=outputs.device)
    # S[c, n, :] = diag[n, c] e_c
    S = eye.unsqueeze(1) * diag.T.unsqueeze(-1)  # [C, N, C]
    return S.reshape(C, N, *out_shape)


def check_generator(generator: object) -> None:
    """``generator`` must be a ``torch.Generator`` or ``None``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None; got {type(generator).__name__}."
            " Pass e.g. torch.Generator().manual_seed(0)."
        )


def check_mc_samples(mc_samples: int | None, generator: object = None) -> None:
    """Raise unless ``mc_samples`` is ``None`` or a positive int and ``generator`` fits.

    Raises:
        ValueError: For ``mc_samples`` that is not a positive int.
        TypeError: For a ``generator`` that is not a ``torch.Generator``.

    """
    if mc_samples is not None and (
        isinstance(mc_samples, bool)
        or not isinstance(mc_samples, int)
        or mc_samples < 1
    ):
        raise ValueError(
            f"mc_samples must be a positive int (sampled factor columns per sample) or "
            f"None for the exact factors; got {mc_samples!r}."
        )
    check_generator(generator)
    if generator is not None and mc_samples is None:
        raise ValueError(
            "generator is only used with mc_samples=M (Monte-Carlo factors); pass "
            "mc_samples or drop generator."
        )


def _uniform(
    shape: tuple[int, ...], outputs: Tensor, generator: torch.Generator | None
) -> Tensor:
    """``U(0, 1)`` draws, made on the generator's device, returned on ``outputs``'."""
    device = outputs.device if generator is None else generator.device
    u = torch.rand(shape, generator=generator, dtype=outputs.dtype, device=device)
    return u.to(outputs.device)


def sampled_loss_hessian_factors(
    loss_func: nn.Module,
    outputs: Tensor,
    targets: Tensor,
    mc_samples: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Monte-Carlo factors ``S̃`` with ``E[Σ_m S̃[m] ⊗ S̃[m]] = ∇²_F L`` per sample.

    Each sample gets ``M = mc_samples`` columns instead of the ``C`` exact ones
    (reduction factor ``ρ`` and target weight ``w`` included as in
    :func:`loss_hessian_factors`):

    * cross-entropy: ``s̃_nm = √(ρ w / M) (onehot(ŷ_m) − p)`` with ``ŷ_m ~ Cat(p)``
      drawn independently at every spatial position, since
      ``E[(e_ŷ − p)(e_ŷ − p)ᵀ] = diag p − p pᵀ`` and draws at different positions are
      independent with mean zero;
    * squared error: ``s̃_nm = √(2ρ / M) z_m`` with Rademacher ``z_m ∈ {±1}^{out}``,
      since ``E[z zᵀ] = I``;
    * binary cross-entropy: ``s̃_nm = √(ρ / M) (ŷ_m − σ)`` with
      ``ŷ_m ~ Bernoulli(σ(F_n))`` per entry, since ``E[(ŷ − σ)²] = σ(1 − σ)``.

    The estimate ``Σ_m s̃_nm s̃_nmᵀ`` is unbiased for every sample, so the MC GGN
    ``J_θᵀ S̃ S̃ᵀ J_θ`` is an unbiased estimate of the exact GGN (also under train-mode
    BatchNorm: ``J`` is exact, only ``H`` is sampled).

    Random numbers: ``U(0, 1)`` draws from ``generator`` (on the generator's device,
    in the outputs' dtype; then moved to the outputs' device), or from the default
    generator of the outputs' device when ``generator`` is ``None``. The same seed
    gives the same factors.

    Args:
        loss_func: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss``.
        outputs: Model outputs ``[N, *out]``; only their values are used.
        targets: Targets, checked by :func:`check_targets`.
        mc_samples: ``M ≥ 1``, sampled columns per sample.
        generator: Source of randomness (see above).

    Returns:
        ``S̃`` of shape ``[M, N, *out]``.

    Example:
        >>> import torch
        >>> out = torch.randn(2, 3, dtype=torch.float64)
        >>> loss = torch.nn.CrossEntropyLoss(reduction="sum")
        >>> S = sampled_loss_hessian_factors(loss, out, torch.tensor([0, 2]), 4,
        ...                                  torch.Generator().manual_seed(0))
        >>> assert S.shape == (4, 2, 3) and torch.allclose(S.sum(-1), torch.zeros(4, 2, dtype=S.dtype))

    """
    check_loss_func(loss_func)
    check_targets(loss_func, outputs, targets)
    check_mc_samples(mc_samples, generator)
    outputs = outputs.detach()
    rho, M = reduction_factor(loss_func, outputs), mc_samples

    if isinstance(loss_func, nn.CrossEntropyLoss):
        K = outputs.shape[1]
        probs = outputs.softmax(dim=1)  # [N, K, *pos]
        pos_shape = outputs.shape[:1] + outputs.shape[2:]  # [N, *pos]
        # inverse CDF: ŷ = #{k : cdf_k < u}, clamped against round-off in cdf_K ≈ 1
        u = _uniform((M, *pos_shape), outputs, generator)  # [M, N, *pos]
        cdf = probs.cumsum(dim=1)
        drawn = (cdf.unsqueeze(0) < u.unsqueeze(2)).sum(dim=2).clamp(max=K - 1)
        onehot = nn.functional.one_hot(drawn, K).movedim(-1, 2).to(outputs.dtype)
        S = onehot - probs.unsqueeze(0)  # [M, N, K, *pos]
        weight = targets.sum(1) if targets.is_floating_point() else None
        if weight is not None:  # [N, *pos] -> [1, N, 1, *pos]
            S = S * weight.sqrt().unsqueeze(1).unsqueeze(0)
        return S * math.sqrt(rho / M)

    u = _uniform((M, *outputs.shape), outputs, generator)  # [M, N, *out]
    if isinstance(loss_func, nn.MSELoss):
        z = torch.where(u < 0.5, -1.0, 1.0).to(outputs.dtype)
        return z * math.sqrt(2.0 * rho / M)
    sigma = outputs.sigmoid()  # BCEWithLogitsLoss
    return ((u < sigma).to(outputs.dtype) - sigma) * math.sqrt(rho / M)
