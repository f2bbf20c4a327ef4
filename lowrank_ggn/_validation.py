"""Early, clear errors on bad input, before any heavy work starts.

Every check names the offending argument and says what to do instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lowrank_ggn.loss_factors import check_loss_func


def check_model(model: nn.Module) -> None:
    """Raise a ``TypeError`` unless ``model`` is an ``nn.Module`` with parameters."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    if next(model.parameters(), None) is None:
        raise ValueError("model has no parameters; there is no GGN to compute.")


def resolve_params(model: nn.Module, params: Sequence[Tensor] | None) -> list[Tensor]:
    """The parameters to differentiate: ``params`` checked, or the trainable ones.

    Raises:
        ValueError: If ``params`` is empty, repeats a tensor, holds a tensor that is
            not a parameter of ``model``, or one that does not require grad.

    """
    owned = {id(p): name for name, p in model.named_parameters()}
    if params is None:
        selected = [p for p in model.parameters() if p.requires_grad]
        if not selected:
            raise ValueError(
                "model has no parameter with requires_grad=True; pass params=[...] "
                "explicitly or enable requires_grad on the parameters of interest."
            )
        return selected
    if isinstance(params, Tensor):
        raise TypeError(
            "params must be a list of parameters, not a single tensor; wrap it: params=[p]."
        )
    selected = list(params)
    if not selected:
        raise ValueError(
            "params is empty; pass at least one parameter of the model, or None."
        )
    seen = set()
    for i, p in enumerate(selected):
        if not isinstance(p, Tensor):
            raise TypeError(
                f"params[{i}] is a {type(p).__name__}, not a torch.nn.Parameter."
            )
        if id(p) not in owned:
            raise ValueError(
                f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of model; pass "
                "tensors from model.parameters()."
            )
        if id(p) in seen:
            raise ValueError(
                f"params[{i}] ({owned[id(p)]}) appears twice; list each parameter once."
            )
        if not p.requires_grad:
            raise ValueError(
                f"params[{i}] ({owned[id(p)]}) has requires_grad=False; drop it from params "
                "or set requires_grad=True."
            )
        seen.add(id(p))
    return selected


def check_inputs(inputs: Tensor, params: Sequence[Tensor]) -> None:
    """Raise if ``inputs`` are not a non-empty finite batch on the parameters' device."""
    if not isinstance(inputs, Tensor):
        raise TypeError(
            f"inputs must be a torch.Tensor with the batch in dim 0; got {type(inputs).__name__}."
        )
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError(
            f"inputs must hold at least one sample in dim 0; got shape {tuple(inputs.shape)}."
        )
    ref = params[0]
    if inputs.device != ref.device:
        raise ValueError(
            f"inputs are on {inputs.device} but the model parameters on {ref.device}; "
            f"move them with inputs.to({str(ref.device)!r})."
        )
    if inputs.is_floating_point():
        if inputs.dtype != ref.dtype:
            raise ValueError(
                f"inputs have dtype {inputs.dtype} but the model parameters {ref.dtype}; "
                f"convert with inputs.to({ref.dtype})."
            )
        if not torch.isfinite(inputs).all():
            raise ValueError("inputs contain NaN or Inf; clean the batch first.")


def check_params_finite(params: Sequence[Tensor], names: Sequence[str]) -> None:
    """Raise a ``ValueError`` naming the first parameter that holds NaN or Inf."""
    for p, name in zip(params, names):
        if not torch.isfinite(p).all():
            raise ValueError(
                f"parameter {name} contains NaN or Inf; the GGN is undefined there."
            )


def check_outputs(outputs: Tensor) -> None:
    """Raise if the model's outputs are not a finite batched tensor."""
    if not isinstance(outputs, Tensor):
        raise TypeError(
            f"the model must return a single Tensor; it returned {type(outputs).__name__}."
        )
    if outputs.dim() == 0:
        raise ValueError(
            "the model returned a scalar; it must return outputs [N, *out]."
        )
    if not torch.isfinite(outputs).all():
        raise ValueError(
            "the model outputs contain NaN or Inf for these inputs and parameters."
        )


def check_batch_norm_batch_size(model: nn.Module, inputs: Tensor) -> None:
    """BatchNorm with batch statistics is undefined for a batch of one sample."""
    from lowrank_ggn.sample_mixing import batch_statistic_modules

    mixing = batch_statistic_modules(model)
    if inputs.shape[0] == 1 and mixing:
        raise ValueError(
            f"inputs hold one sample, but {', '.join(mixing)} normalize with batch "
            "statistics (train mode); pass a batch of at least 2 samples, or call the "
            "model's BatchNorm layers in eval mode."
        )


def check_call(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    params: Sequence[Tensor] | None,
) -> list[Tensor]:
    """All checks that need no forward pass; returns the resolved parameter list."""
    check_model(model)
    check_loss_func(loss_func)
    selected = resolve_params(model, params)
    check_inputs(inputs, selected)
    check_batch_norm_batch_size(model, inputs)
    return selected
