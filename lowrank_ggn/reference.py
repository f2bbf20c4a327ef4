r"""Brute-force references, for tests and experiments: one honest definition of the truth.

Everything here differentiates the *whole batch loss* with :mod:`torch.func`,
without any structural assumption (no per-sample split, no loss factorisation):

.. math::
    G = J^⊤ H J,\qquad J = \frac{∂ \operatorname{vec} F(X, θ)}{∂ θ} ∈ ℝ^{(N·O) × D},
    \qquad H = ∇²_F L(F, Y) ∈ ℝ^{(N·O) × (N·O)},

where ``O = Π out``. Memory is ``O(N·O·D + D²)``: use small models. A tuple of
targets is passed positionally, ``loss_func(outputs, *targets)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import hessian, jacrev

from lowrank_ggn.core.budget import check_memory
from lowrank_ggn.core.inputs import as_inputs
from lowrank_ggn.core.loss_targets import check_targets
from lowrank_ggn.core.losses.autodiff import call_loss
from lowrank_ggn.core.losses.registry import has_closed_form
from lowrank_ggn.core.model import FunctionalModel
from lowrank_ggn.core.outputs import OutputSpec, check_output
from lowrank_ggn.core.state import model_preserved
from lowrank_ggn.core.validation import (
    check_batch_norm_batch_size,
    check_inputs,
    check_model,
    check_outputs,
    check_params_finite,
    resolve_params,
)


def _flat_model(
    model: nn.Module,
    params: Sequence[Tensor] | None,
    inputs: Tensor | None = None,
    output: OutputSpec = None,
):
    check_model(model)
    check_output(output)
    fmodel = FunctionalModel(model, resolve_params(model, params), output)
    if inputs is not None:  # the same early errors as the engine's
        check_inputs(inputs, fmodel.params)
        check_batch_norm_batch_size(model, inputs)
        check_params_finite(fmodel.params, fmodel.names)
    flat = fmodel.flatten(fmodel.primals())
    return fmodel, flat


def _scalar_loss(loss_func, outputs: Tensor, targets) -> None:
    """Refuse a loss that is not a callable returning a finite scalar tensor."""
    if not callable(loss_func):
        raise TypeError(
            f"loss_func must be callable as loss_func(outputs, targets); got "
            f"{type(loss_func).__name__}."
        )
    if has_closed_form(loss_func):  # the same target errors as the engine's
        check_targets(loss_func, outputs, targets)
    value = call_loss(loss_func, outputs, targets)
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError(
            "loss_func must return a scalar tensor (a batch loss); use "
            "reduction='mean' or 'sum'."
        )


def dense_jacobian(
    model: nn.Module,
    inputs: Tensor,
    *,
    params: Sequence[Tensor] | None = None,
    output: OutputSpec = None,
) -> Tensor:
    """``J = ∂ vec F(X, θ) / ∂θ``, ``[N, *out, D]``, of the whole batch."""
    with model_preserved(model):
        fmodel, flat = _flat_model(model, params, inputs, output)
        return jacrev(lambda v: fmodel(fmodel.unflatten(v), inputs))(flat)


def dense_output_hessian(
    loss_func: nn.Module, outputs: Tensor, targets: Tensor
) -> Tensor:
    """``H = ∇²_F L(F, Y)``, ``[N·O, N·O]``, of the batch loss w.r.t. all outputs."""
    _scalar_loss(loss_func, outputs.detach(), targets)
    M = outputs.numel()
    check_memory(
        {f"output Hessian [{M}, {M}]": M * M},
        outputs.element_size(),
        advice="Use a smaller batch or fewer outputs for the brute-force reference. ",
    )
    H = hessian(lambda o: call_loss(loss_func, o.reshape(outputs.shape), targets))(
        outputs.detach().flatten()
    )
    return H.reshape(M, M)


def dense_outputs(
    model: nn.Module,
    inputs: Tensor,
    *,
    params: Sequence[Tensor] | None = None,
    output: OutputSpec = None,
) -> Tensor:
    """``F(X, θ)`` computed without touching the model's buffers.

    Through the kernels a differentiated pass takes
    (:meth:`~lowrank_ggn.core.model.FunctionalModel.evaluate`): attention modules in
    eval mode compute another function on padded positions without grad.
    """
    with model_preserved(model):
        fmodel, _ = _flat_model(model, params, inputs, output)
        outputs = fmodel.evaluate(inputs)
        check_outputs(outputs, as_inputs(inputs).size)
        return outputs


def dense_ggn(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Sequence[Tensor] | None = None,
    output: OutputSpec = None,
) -> Tensor:
    """The GGN ``Jᵀ H J`` ``[D, D]`` of the batch loss, by brute force.

    Args:
        model: Any module; BatchNorm in train mode is differentiated as it runs.
        loss_func: Any scalar loss ``loss_func(outputs, targets)``.
        inputs: ``[N, *in]``.
        targets: Targets.
        params: Parameters (flattening order); default: all that require grad.
        output: Which tensor of the model's return value the loss takes
            (:mod:`lowrank_ggn.core.outputs`); every function here takes it.

    Returns:
        ``[D, D]``, symmetric.

    """
    with model_preserved(model):
        J, H = _jacobian_and_hessian(
            model, loss_func, inputs, targets, params, output, with_ggn=True
        )
        G = J.T @ H @ J
        return 0.5 * (G + G.T)


def _jacobian_and_hessian(
    model, loss_func, inputs, targets, params, output, with_ggn: bool
) -> tuple[Tensor, Tensor]:
    """``J`` ``[N·O, D]`` and ``H`` ``[N·O, N·O]``, memory checked (and the GGN's)."""
    outputs = dense_outputs(model, inputs, params=params, output=output)
    _scalar_loss(loss_func, outputs, targets)
    M = outputs.numel()
    D = sum(p.numel() for p in resolve_params(model, params))
    needs = {f"Jacobian [{M}, {D}]": M * D}
    if with_ggn:
        needs[f"GGN [{D}, {D}]"] = D * D
    check_memory(
        needs,
        outputs.element_size(),
        advice="The brute-force reference is for small models and batches. ",
    )
    J = dense_jacobian(model, inputs, params=params, output=output).reshape(M, -1)
    return J, dense_output_hessian(loss_func, outputs, targets)


def dense_ggn_eigenvalues(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Sequence[Tensor] | None = None,
    output: OutputSpec = None,
) -> Tensor:
    r"""All eigenvalues of ``Jᵀ H J`` that can be nonzero, descending, by brute force.

    Without the ``[D, D]`` matrix, for models too large for :func:`dense_ggn`: with
    ``H = Q Λ Qᵀ`` (clipped at 0; ``H`` is PSD for the losses the GGN is defined
    for) and ``R = Q Λ^{1/2}``, ``Jᵀ H J = (Jᵀ R)(Jᵀ R)ᵀ`` has the nonzero
    eigenvalues of the ``[N·O, N·O]`` matrix ``Rᵀ J Jᵀ R``. Memory: the dense
    Jacobian ``[N·O, D]``.

    Returns:
        ``[N·O]``, descending (the trailing ones are zero up to round-off).
    """
    with model_preserved(model):
        J, H = _jacobian_and_hessian(
            model, loss_func, inputs, targets, params, output, with_ggn=False
        )
        lam, Q = torch.linalg.eigh(0.5 * (H + H.T))
        R = Q * lam.clamp(min=0).sqrt()  # [M, M]
        JR = J.T @ R  # [D, M]
        return torch.linalg.eigvalsh(JR.T @ JR).flip(0)


def dense_gradient(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Sequence[Tensor] | None = None,
    output: OutputSpec = None,
) -> Tensor:
    """``∇_θ L`` ``[D]`` of the batch loss."""
    with model_preserved(model):
        _scalar_loss(loss_func, dense_outputs(model, inputs, params=params, output=output), targets)
        fmodel, flat = _flat_model(model, params, inputs, output)
        return torch.func.grad(
            lambda v: call_loss(loss_func, fmodel(fmodel.unflatten(v), inputs), targets)
        )(flat)


def dense_per_component_gradients(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Sequence[Tensor] | None = None,
    output: OutputSpec = None,
) -> Tensor:
    r"""Rows ``r_n = J_θF_nᵀ ∂L/∂F_n``, ``[N, D]``, by brute force.

    ``J`` is the dense Jacobian of the whole batch function (:func:`dense_jacobian`),
    ``∂L/∂F`` the gradient of the whole batch loss with respect to all outputs: no
    per-sample split of the model is assumed. Row ``n`` is the full-batch
    vector-Jacobian product with the cotangent ``e_n ⊗ ∂L/∂F_n``; the rows sum to
    :func:`dense_gradient`.
    """
    with model_preserved(model):
        J = dense_jacobian(model, inputs, params=params, output=output)  # [N, *out, D]
        outputs = dense_outputs(model, inputs, params=params, output=output)
        g = torch.func.grad(lambda o: call_loss(loss_func, o, targets))(outputs)
        N, D = outputs.shape[0], J.shape[-1]
        return torch.einsum("no,nod->nd", g.reshape(N, -1), J.reshape(N, -1, D))


def dense_loss_hessian_blocks(
    loss_func: nn.Module, outputs: Tensor, targets: Tensor
) -> Tensor:
    """Diagonal blocks ``∇²_{F_n} L``, ``[N, O, O]``, cut from :func:`dense_output_hessian`."""
    N = outputs.shape[0]
    n_out = outputs[0].numel()
    H = dense_output_hessian(loss_func, outputs, targets).reshape(N, n_out, N, n_out)
    idx = torch.arange(N, device=outputs.device)
    return H[idx, :, idx, :]


def dense_directional_derivatives(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    directions: Tensor,
    rho: float,
    *,
    params: Sequence[Tensor] | None = None,
    output: OutputSpec = None,
) -> tuple[Tensor, Tensor]:
    r"""``(γ, λ)``, each ``[N, K]``, by brute force, for directions ``[K, D]``.

    ``γ_nk = e_kᵀ r_n / ρ`` from :func:`dense_per_component_gradients` and
    ``λ_nk = (J_n e_k)ᵀ (∇²_{F_n} L) (J_n e_k) / ρ`` from the dense Jacobian and the
    diagonal blocks of the dense output Hessian. ``ρ`` is the per-sample weight in
    ``L = ρ Σ_n ℓ_n`` (``1/N`` for ``reduction='mean'``, 1 for ``'sum'``:
    :func:`lowrank_ggn.core.loss_factors.sample_weight`).
    """
    with model_preserved(model):
        R = dense_per_component_gradients(
            model, loss_func, inputs, targets, params=params, output=output
        )
        J = dense_jacobian(model, inputs, params=params, output=output)
        outputs = dense_outputs(model, inputs, params=params, output=output)
        N = outputs.shape[0]
        Je = J.reshape(N, -1, J.shape[-1]) @ directions.T  # [N, O, K]
        H = dense_loss_hessian_blocks(loss_func, outputs, targets)  # [N, O, O]
        lambdas = torch.einsum("nok,nop,npk->nk", Je, H, Je) / rho
        return R @ directions.T / rho, lambdas
