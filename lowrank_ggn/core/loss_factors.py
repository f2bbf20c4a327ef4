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

Any other loss ``loss(outputs, targets) -> scalar`` with this structure (``HuberLoss``,
``SmoothL1Loss``, ``GaussianNLLLoss`` with targets ``(target, var)``,
``PoissonNLLLoss``, ``KLDivLoss(reduction='batchmean')``, ``CrossEntropyLoss`` with
``label_smoothing``, a plain function, …) is wrapped by :func:`resolve_loss` into an
:class:`~lowrank_ggn.core.loss_autodiff.AutodiffLoss`: its structure is checked
numerically, and its factors are the eigendecomposition square roots of the per-sample
Hessians from automatic differentiation, with ``C`` their largest rank
(:mod:`lowrank_ggn.core.loss_hessians`). The closed forms above are the fast paths.

Reference: Dangel, Tatzel & Hennig, *ViViT: Curvature access through the generalized
Gauss-Newton's low-rank structure*, TMLR 2022, https://arxiv.org/abs/2106.02624.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lowrank_ggn.core.inputs import ModelInputs
from lowrank_ggn.core.loss_autodiff import (
    MODULE_REDUCTIONS,
    AutodiffLoss,
    check_structure,
    sample_weight_of,
)
from lowrank_ggn.core.loss_hessians import autodiff_hessian_factors, gaussian_sketch

#: Losses with closed-form factors (exact types, default options).
SUPPORTED_LOSSES = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)

#: Losses whose class-index targets are checked like cross-entropy's.
_CLASS_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss)


def check_loss_func(loss_func: object) -> None:
    """Raise if ``loss_func`` cannot be a per-sample loss plus reduction.

    Accepts any callable ``loss_func(outputs, targets) -> scalar`` (a loss module or
    a function); whether it has the structure is checked numerically on the first
    batch (:func:`check_targets`). Refused here, before any forward pass:

    Raises:
        TypeError: If ``loss_func`` is not callable.
        NotImplementedError: For a module with ``reduction`` other than ``'mean'``,
            ``'batchmean'`` or ``'sum'`` (``'none'``: no scalar loss), and for
            ``CrossEntropyLoss``/``NLLLoss`` with class weights and
            ``reduction='mean'``, which divide by the batch's total weight
            ``Σ_n w_{y_n}`` instead of a fixed ``ρ``.

    """
    if isinstance(loss_func, AutodiffLoss):
        return
    if not callable(loss_func):
        raise TypeError(
            "loss_func must be callable as loss_func(outputs, targets) -> scalar (a "
            f"torch.nn loss module or a function); got {type(loss_func).__name__}. "
            "Pass e.g. torch.nn.CrossEntropyLoss()."
        )
    if not isinstance(loss_func, nn.Module):
        return
    name = type(loss_func).__name__
    reduction = getattr(loss_func, "reduction", None)
    if reduction is not None and reduction not in MODULE_REDUCTIONS:
        raise NotImplementedError(
            f"loss_func.reduction={reduction!r} is not supported: the GGN needs a "
            "scalar loss. Use reduction='mean' or 'sum'."
        )
    if (
        isinstance(loss_func, _CLASS_LOSSES)
        and getattr(loss_func, "weight", None) is not None
        and reduction == "mean"
    ):
        raise NotImplementedError(
            f"{name}(weight=...) with reduction='mean' is not supported: it divides "
            "by the batch's total class weight Σ_n w[y_n], not by a fixed number, so "
            "the loss is not ρ Σ_n ℓ_n. Use reduction='sum' (divide by your own "
            "constant if needed) or drop weight."
        )


def has_closed_form(loss_func: object) -> bool:
    """Whether ``loss_func`` has closed-form factors: exact type, default options."""
    return (
        type(loss_func) in SUPPORTED_LOSSES
        and getattr(loss_func, "weight", None) is None
        and getattr(loss_func, "pos_weight", None) is None
        and getattr(loss_func, "label_smoothing", 0.0) == 0.0
    )


def resolve_loss(loss_func: object) -> nn.Module:
    """The loss as the engine uses it.

    Closed-form losses (exact ``CrossEntropyLoss``, ``MSELoss``,
    ``BCEWithLogitsLoss`` without weights or label smoothing) are returned
    unchanged; every other loss is wrapped in an
    :class:`~lowrank_ggn.core.loss_autodiff.AutodiffLoss` (a wrapper is returned as
    it is). Pass one resolved loss to every batch: its ``reduction`` is fixed by the
    first batch that determines it.

    Raises:
        TypeError, NotImplementedError: See :func:`check_loss_func`.

    Example:
        >>> import torch
        >>> assert type(resolve_loss(torch.nn.MSELoss())) is torch.nn.MSELoss
        >>> wrapped = resolve_loss(torch.nn.HuberLoss(reduction="sum"))
        >>> assert wrapped.reduction == "sum" and resolve_loss(wrapped) is wrapped

    """
    check_loss_func(loss_func)
    if isinstance(loss_func, AutodiffLoss) or has_closed_form(loss_func):
        return loss_func
    return AutodiffLoss(loss_func)


def num_factor_columns(loss_func: nn.Module, output_shape: torch.Size) -> int:
    """``C``, the number of factor columns per sample for outputs ``[N, *out]``.

    Exact for the closed forms (``O = Π out``); for an
    :class:`~lowrank_ggn.core.loss_autodiff.AutodiffLoss` an upper bound, since its
    ``C`` is the largest rank of the per-sample Hessians, known only once they are
    factorised (memory checks stay conservative).
    """
    return math.prod(output_shape[1:])


def reduction_factor(loss_func: nn.Module, outputs: Tensor) -> float:
    """``ρ`` of the closed forms' per-entry terms (CE: per position), else of ``ℓ_n``.

    For :class:`~lowrank_ggn.core.loss_autodiff.AutodiffLoss`, ``ρ`` multiplies the
    per-sample losses ``ℓ_n`` (as in :func:`sample_weight`).
    """
    if isinstance(loss_func, AutodiffLoss):
        return sample_weight_of(loss_func.reduction, outputs.shape[0])
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

    ``loss_func`` is a resolved loss (:func:`resolve_loss`, after
    :func:`check_targets` on a batch): a plain function has no ``reduction``.
    """
    reduction = getattr(loss_func, "reduction", None)
    if reduction is None:
        raise TypeError(
            f"sample_weight needs a loss with a reduction; got {type(loss_func).__name__}. "
            "Resolve it first: loss_func = resolve_loss(loss_func), then "
            "check_targets(loss_func, outputs, targets)."
        )
    return sample_weight_of(MODULE_REDUCTIONS.get(reduction, reduction), batch_size)


def _check_outputs(outputs: Tensor) -> None:
    """``outputs`` are a finite floating tensor ``[N, *out]`` with ``N ≥ 1``."""
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
    if not torch.isfinite(outputs).all():
        raise ValueError("outputs contain NaN or Inf; the loss Hessian is undefined.")


def _check_target_tensor(
    target: Tensor, outputs: Tensor, label: str = "targets"
) -> None:
    """Device and finiteness of one target tensor."""
    if target.device != outputs.device:
        raise ValueError(
            f"{label} are on {target.device} but the outputs on {outputs.device}; "
            f"move them with {label}.to({str(outputs.device)!r})."
        )
    if target.is_floating_point() and not torch.isfinite(target).all():
        raise ValueError(
            f"{label} contain NaN or Inf; clean the batch first (torch.isfinite)."
        )


def _check_batch_size(targets: Tensor, outputs: Tensor) -> None:
    if targets.shape[:1] != outputs.shape[:1]:
        raise ValueError(
            f"targets have batch size {targets.shape[0] if targets.dim() else 'none'} "
            f"but the model outputs have batch size {outputs.shape[0]}; pass one "
            "target per input sample."
        )


def _check_class_targets(
    name: str, ignore_index: int, outputs: Tensor, targets: Tensor
) -> None:
    """Cross-entropy targets: class indices ``[N, *pos]`` or probabilities ``[N, K, *pos]``."""
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
    if (targets == ignore_index).any():
        raise NotImplementedError(
            f"targets contain ignore_index={ignore_index}; ignored "
            "targets are not supported. Drop those samples from the batch."
        )
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= K:
        raise ValueError(
            f"targets must lie in [0, {K}) for {name} with {K} classes; got "
            f"values in [{lo}, {hi}]."
        )


def _check_autodiff_targets(
    loss_func: AutodiffLoss, outputs: Tensor, targets: object
) -> None:
    """A tensor ``[N, …]`` or a tuple with a per-sample entry; class checks for CE/NLL."""
    if isinstance(targets, tuple):
        for i, t in enumerate(targets):
            if isinstance(t, Tensor):
                _check_target_tensor(t, outputs, f"targets[{i}]")
        ModelInputs(targets, outputs.shape[0], name="targets")  # one entry with N rows
        return
    if not isinstance(targets, Tensor):
        raise TypeError(
            "targets must be a torch.Tensor, or a tuple passed as "
            f"loss_func(outputs, *targets); got {type(targets).__name__}."
        )
    _check_target_tensor(targets, outputs)
    _check_batch_size(targets, outputs)
    inner = loss_func.loss
    if isinstance(inner, _CLASS_LOSSES) and not (
        isinstance(inner, nn.NLLLoss) and targets.is_floating_point()
    ):
        _check_class_targets(type(inner).__name__, inner.ignore_index, outputs, targets)


def check_targets(
    loss_func: nn.Module, outputs: Tensor, targets: object, structure: bool = True
) -> None:
    """Raise if ``targets`` do not fit ``outputs``, or the loss lacks the structure.

    For the closed-form losses: shapes, dtypes and ranges of the targets. For every
    other loss (resolved into an
    :class:`~lowrank_ggn.core.loss_autodiff.AutodiffLoss`, whose ``reduction`` this
    fixes): the targets are a tensor with ``N`` rows or a tuple with such an entry,
    and the numerical check that ``L = ρ Σ_n ℓ_n`` with a Hessian that does not
    couple samples (:func:`~lowrank_ggn.core.loss_autodiff.check_structure`).

    Args:
        loss_func: A loss (see :func:`check_loss_func`), preferably resolved by
            :func:`resolve_loss` so that the determined ``reduction`` is kept.
        outputs: Model outputs ``[N, *out]``.
        targets: Targets for the batch (a tuple: ``loss_func(outputs, *targets)``).
        structure: Run the numerical structure check (the audit reports it instead).

    Raises:
        ValueError, TypeError, NotImplementedError: Naming what does not fit.

    """
    _check_outputs(outputs)
    if not has_closed_form(loss_func):
        loss_func = resolve_loss(loss_func)
        _check_autodiff_targets(loss_func, outputs, targets)
        if structure:
            check_structure(loss_func, outputs, targets)
        return
    name = type(loss_func).__name__
    if not isinstance(targets, Tensor):
        raise TypeError(
            f"targets must be a torch.Tensor for {name}; got {type(targets).__name__}"
        )
    _check_target_tensor(targets, outputs)
    _check_batch_size(targets, outputs)
    if isinstance(loss_func, nn.CrossEntropyLoss):
        _check_class_targets(name, loss_func.ignore_index, outputs, targets)
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
    loss_func: object,
    outputs: Tensor,
    targets: object,
    memory_budget: float | None = None,
) -> Tensor:
    r"""Factors ``S`` with ``∇²_F L = Σ_c S[c] ⊗ S[c]`` per sample, reduction included.

    Closed forms for ``CrossEntropyLoss``, ``MSELoss`` and ``BCEWithLogitsLoss``
    (module docstring); for any other loss, the eigendecomposition square roots of
    the per-sample Hessians from automatic differentiation
    (:mod:`lowrank_ggn.core.loss_hessians`), after the numerical structure check
    (:mod:`lowrank_ggn.core.loss_autodiff`).

    Args:
        loss_func: A loss ``loss_func(outputs, targets) -> scalar`` with the
            per-sample-plus-reduction structure (see :func:`resolve_loss`).
        outputs: Model outputs ``[N, *out]``; only their values are used.
        targets: Targets, checked by :func:`check_targets` (a tuple is passed as
            ``loss_func(outputs, *targets)``).
        memory_budget: Bytes the autodiff path's per-sample Hessians ``[N, O, O]``
            may take (:mod:`lowrank_ggn.core.budget`); ``None``: environment or
            default.

    Returns:
        ``S`` of shape ``[C, N, *out]``. For every sample ``n``,
        ``Σ_c S[c, n] S[c, n]ᵀ = ∇²_{F_n} L`` (flattened over ``*out``), and
        ``S[c, m] = 0`` never couples samples: the Hessian is block diagonal. For
        autodiff losses ``C`` is the largest per-sample rank (at most ``Π out``).

    Raises:
        ValueError: For an autodiff loss that couples samples or whose per-sample
            Hessian is not positive semi-definite.

    Example:
        >>> import torch
        >>> out = torch.randn(4, 3, dtype=torch.float64)
        >>> S = loss_hessian_factors(torch.nn.MSELoss(reduction="sum"), out, out)
        >>> assert torch.allclose(torch.einsum("cnk,cnl->nkl", S, S)[0], 2 * torch.eye(3, dtype=out.dtype))

    """
    loss_func = resolve_loss(loss_func)
    check_targets(loss_func, outputs, targets)
    if isinstance(loss_func, AutodiffLoss):
        return autodiff_hessian_factors(loss_func, outputs, targets, memory_budget)
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
    loss_func: object,
    outputs: Tensor,
    targets: object,
    mc_samples: int,
    generator: torch.Generator | None = None,
    memory_budget: float | None = None,
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
      ``ŷ_m ~ Bernoulli(σ(F_n))`` per entry, since ``E[(ŷ − σ)²] = σ(1 − σ)``;
    * any other (autodiff) loss: Gaussian sketches ``s̃_nm = S_n z_nm / √M`` of the
      exact factors ``S_n`` ``[O, C]`` (:func:`loss_hessian_factors`) with
      ``z_nm ~ N(0, I_C)``, since ``E[S z zᵀ Sᵀ] = S Sᵀ``; each ``s̃_nm`` is
      ``N(0, ∇²_{F_n} L / M)`` whatever eigenbasis ``S_n`` holds. The exact
      per-sample Hessians are still formed: the saving is in the Gram matrix
      (``N·M`` instead of ``N·C`` columns).

    The estimate ``Σ_m s̃_nm s̃_nmᵀ`` is unbiased for every sample, so the MC GGN
    ``J_θᵀ S̃ S̃ᵀ J_θ`` is an unbiased estimate of the exact GGN (also under train-mode
    BatchNorm: ``J`` is exact, only ``H`` is sampled).

    Random numbers: ``U(0, 1)`` draws (closed forms) or ``N(0, 1)`` draws ``[M, N, C]``
    (autodiff losses) from ``generator`` (on the generator's device, in the outputs'
    dtype; then moved to the outputs' device), or from the default generator of the
    outputs' device when ``generator`` is ``None``. The same seed gives the same
    factors.

    Args:
        loss_func: A loss, as for :func:`loss_hessian_factors`.
        outputs: Model outputs ``[N, *out]``; only their values are used.
        targets: Targets, checked by :func:`check_targets`.
        mc_samples: ``M ≥ 1``, sampled columns per sample.
        generator: Source of randomness (see above).
        memory_budget: As for :func:`loss_hessian_factors`.

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
    loss_func = resolve_loss(loss_func)
    check_targets(loss_func, outputs, targets)
    check_mc_samples(mc_samples, generator)
    if isinstance(loss_func, AutodiffLoss):
        exact = autodiff_hessian_factors(loss_func, outputs, targets, memory_budget)
        return gaussian_sketch(exact, mc_samples, generator)
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
