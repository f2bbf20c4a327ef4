r"""Brute-force references, for tests and experiments: one honest definition of the truth.

Everything here differentiates the *whole batch loss* with :mod:`torch.func`,
without any structural assumption (no per-sample split, no loss factorisation):

.. math::
    G = J^⊤ H J,\qquad J = \frac{∂ \operatorname{vec} F(X, θ)}{∂ θ} ∈ ℝ^{(N·O) × D},
    \qquad H = ∇²_F L(F, Y) ∈ ℝ^{(N·O) × (N·O)},

where ``O = Π out``. Memory is ``O(N·O·D + D²)``: use small models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import hessian, jacrev

from lowrank_ggn._model import FunctionalModel
from lowrank_ggn._state import model_preserved
from lowrank_ggn._validation import resolve_params


def _flat_model(model: nn.Module, params: Sequence[Tensor] | None):
    fmodel = FunctionalModel(model, resolve_params(model, params))
    flat = fmodel.flatten(fmodel.primals())
    return fmodel, flat


def dense_jacobian(
    model: nn.Module, inputs: Tensor, *, params: Sequence[Tensor] | None = None
) -> Tensor:
    """``J = ∂ vec F(X, θ) / ∂θ``, ``[N, *out, D]``, of the whole batch."""
    with model_preserved(model):
        fmodel, flat = _flat_model(model, params)
        return jacrev(lambda v: fmodel(fmodel.unflatten(v), inputs))(flat)


def dense_output_hessian(
    loss_func: nn.Module, outputs: Tensor, targets: Tensor
) -> Tensor:
    """``H = ∇²_F L(F, Y)``, ``[N·O, N·O]``, of the batch loss w.r.t. all outputs."""
    M = outputs.numel()
    H = hessian(lambda o: loss_func(o.reshape(outputs.shape), targets))(
        outputs.detach().flatten()
    )
    return H.reshape(M, M)


def dense_outputs(
    model: nn.Module, inputs: Tensor, *, params: Sequence[Tensor] | None = None
) -> Tensor:
    """``F(X, θ)`` computed without touching the model's buffers."""
    with model_preserved(model), torch.no_grad():
        fmodel, _ = _flat_model(model, params)
        return fmodel(fmodel.primals(), inputs)


def dense_ggn(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Sequence[Tensor] | None = None,
) -> Tensor:
    """The GGN ``Jᵀ H J`` ``[D, D]`` of the batch loss, by brute force.

    Args:
        model: Any module; BatchNorm in train mode is differentiated as it runs.
        loss_func: Any scalar loss ``loss_func(outputs, targets)``.
        inputs: ``[N, *in]``.
        targets: Targets.
        params: Parameters (flattening order); default: all that require grad.

    Returns:
        ``[D, D]``, symmetric.

    """
    with model_preserved(model):
        J = dense_jacobian(model, inputs, params=params)
        outputs = dense_outputs(model, inputs, params=params)
        J = J.reshape(outputs.numel(), -1)
        H = dense_output_hessian(loss_func, outputs, targets)
        G = J.T @ H @ J
        return 0.5 * (G + G.T)


def dense_gradient(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Sequence[Tensor] | None = None,
) -> Tensor:
    """``∇_θ L`` ``[D]`` of the batch loss."""
    with model_preserved(model):
        fmodel, flat = _flat_model(model, params)
        return torch.func.grad(
            lambda v: loss_func(fmodel(fmodel.unflatten(v), inputs), targets)
        )(flat)
