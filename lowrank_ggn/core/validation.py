r"""Early, clear errors on bad input, before any heavy work starts.

Every check names the offending argument and says what to do instead. The public
functions call them in this order:

1. **Before the forward pass** (:func:`check_call`, :func:`check_options`): the
   model, the loss (:func:`lowrank_ggn.core.loss_factors.check_loss_func`),
   ``params``, the inputs (a tensor, tuple or dict; non-empty, finite, dtype and
   device of the parameters), the targets' type,
   device, batch size and finiteness, a batch of one under BatchNorm with batch
   statistics, and the options ``chunk``, ``rtol``, ``top_k``, ``memory_budget``.
2. **After the forward pass, before any backward pass**: finite outputs of batch size
   ``N`` (:func:`check_outputs`), targets that fit outputs and loss
   (:func:`lowrank_ggn.core.loss_targets.check_targets`), and the memory budget
   (:func:`check_memory`), from the sizes that the output shape determines; ``S`` is
   checked before it is formed, ``Vᵀ`` and the Gram matrix before the first backward
   pass.

The memory budget and its checks are in :mod:`lowrank_ggn.core.budget`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lowrank_ggn.core.budget import resolve_memory_budget
from lowrank_ggn.core.inputs import ModelInputs, as_inputs, check_entries
from lowrank_ggn.core.losses.registry import check_loss_func

#: Parameter dtypes the engine computes in (``eigh`` and the zero threshold need them).
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def check_model(model: nn.Module) -> None:
    """Raise unless ``model`` is an initialised ``nn.Module`` with parameters.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
        ValueError: If it has no parameters or uninitialised (lazy) parameters.

    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    if next(model.parameters(), None) is None:
        raise ValueError("model has no parameters; there is no GGN to compute.")
    check_initialized(model)


def check_initialized(model: nn.Module) -> None:
    """Raise a ``ValueError`` if ``model`` has lazy, uninitialised parameters."""
    if any(
        isinstance(t, nn.parameter.UninitializedTensorMixin)
        for t in [*model.parameters(), *model.buffers()]
    ):
        raise ValueError(
            "model has uninitialized (lazy) parameters; run one forward pass on a "
            "batch first so that their shapes are known."
        )


def resolve_params(model: nn.Module, params: Sequence[Tensor] | None) -> list[Tensor]:
    """The parameters to differentiate: ``params`` checked, or the trainable ones.

    Raises:
        TypeError: If ``params`` is a single tensor or holds a non-tensor.
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
        _check_param_types(selected, [owned[id(p)] for p in selected])
        return selected
    if isinstance(params, Tensor):
        raise TypeError(
            "params must be a list of parameters, not a single tensor; wrap it: params=[p]."
        )
    if isinstance(params, (str, bytes, Mapping)) or not hasattr(params, "__iter__"):
        raise TypeError(
            f"params must be a sequence of parameters of model; got "
            f"{type(params).__name__}. Pass e.g. list(model.parameters())."
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
                f"params[{i}] is a {type(p).__name__}, not a torch.nn.Parameter; pass "
                "tensors from model.parameters()."
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
    _check_param_types(selected, [owned[id(p)] for p in selected])
    return selected


def _check_param_types(params: Sequence[Tensor], names: Sequence[str]) -> None:
    """All selected parameters are float32/float64 on one device, of one dtype."""
    ref, ref_name = params[0], names[0]
    for p, name in zip(params, names):
        if p.dtype not in SUPPORTED_DTYPES:
            raise NotImplementedError(
                f"parameter {name} has dtype {p.dtype}; lowrank_ggn computes in float32 "
                "or float64. Run it on a converted copy, e.g. "
                "copy.deepcopy(model).double()."
            )
        if p.dtype != ref.dtype or p.device != ref.device:
            raise ValueError(
                f"parameters {ref_name} ({ref.dtype}, {ref.device}) and {name} "
                f"({p.dtype}, {p.device}) differ in dtype or device; move the model to "
                "one dtype and device (model.to(...)) or select params of one kind."
            )


def check_inputs(
    inputs: object, params: Sequence[Tensor], batch_size: int | None = None
) -> ModelInputs:
    """Raise if ``inputs`` are not a non-empty finite batch on the parameters' device.

    ``inputs`` may be a tensor, a tuple (positional) or a dict (keyword) of entries
    (:mod:`lowrank_ggn.core.inputs`). Floating-point entries must have the parameters'
    dtype; integer entries (token indices) and boolean masks are accepted as they are.

    Returns:
        The inputs as :class:`~lowrank_ggn.core.inputs.ModelInputs`.
    """
    if isinstance(inputs, Tensor) and (inputs.dim() == 0 or inputs.shape[0] == 0):
        raise ValueError(
            f"inputs must hold at least one sample in dim 0; got shape {tuple(inputs.shape)}."
        )
    view = as_inputs(inputs, batch_size)
    check_entries(view, params[0])
    return view


def check_targets_early(
    targets: object, inputs: object, params: Sequence[Tensor]
) -> None:
    """What can be checked about ``targets`` before the forward pass.

    Type, device, batch size (``N`` of ``inputs``), dtype of floating targets and
    finiteness. A tuple of targets (passed as ``loss(outputs, *targets)``) is checked
    entry by entry and needs one entry with ``N`` rows. Shapes that depend on the
    outputs are checked afterwards by
    :func:`lowrank_ggn.core.loss_targets.check_targets`.
    """
    N = as_inputs(inputs).size
    if isinstance(targets, tuple):
        view = ModelInputs(targets, N, name="targets")
        check_entries(view, params[0])
        return
    if not isinstance(targets, Tensor):
        raise TypeError(
            f"targets must be a torch.Tensor (or a tuple of tensors for losses with "
            f"several target arguments); got {type(targets).__name__}. Convert with "
            "torch.as_tensor(targets)."
        )
    if targets.device != params[0].device:  # before the batch size: the likelier fix
        check_entries(ModelInputs(targets, name="targets"), params[0])
    if targets.dim() == 0 or targets.shape[0] != N:
        got = targets.shape[0] if targets.dim() else "none (a scalar)"
        raise ValueError(
            f"targets have batch size {got} but inputs have {N}; pass one target per "
            "input sample, batch in dim 0."
        )
    check_entries(ModelInputs(targets, N, name="targets"), params[0])


def check_params_finite(params: Sequence[Tensor], names: Sequence[str]) -> None:
    """Raise a ``ValueError`` naming the first parameter that holds NaN or Inf."""
    for p, name in zip(params, names):
        if not torch.isfinite(p).all():
            raise ValueError(
                f"parameter {name} contains NaN or Inf; the GGN is undefined there. "
                "Check the training run that produced these weights."
            )


def check_outputs(outputs: Tensor, batch_size: int | None = None) -> None:
    """Raise if the model's outputs are not a finite ``[N, *out]`` floating tensor."""
    if not isinstance(outputs, Tensor):
        raise TypeError(
            f"the model must return a single Tensor; it returned {type(outputs).__name__}."
        )
    if outputs.dim() == 0:
        raise ValueError(
            "the model returned a scalar; it must return outputs [N, *out]."
        )
    if batch_size is not None and outputs.shape[0] != batch_size:
        raise ValueError(
            f"the model returned outputs of shape {tuple(outputs.shape)} for {batch_size} "
            "inputs; it must keep the batch in dim 0 (one output per sample)."
        )
    if not outputs.is_floating_point():
        raise TypeError(
            f"the model returned outputs of dtype {outputs.dtype}; they must be "
            "floating point to be differentiated."
        )
    if not torch.isfinite(outputs).all():
        raise ValueError(
            "the model outputs contain NaN or Inf for these inputs and parameters; "
            "the GGN is undefined there."
        )


def check_batch_norm_batch_size(model: nn.Module, inputs: object) -> None:
    """BatchNorm with batch statistics is refused for a batch of one sample."""
    from lowrank_ggn.core.paths import batch_statistic_modules

    mixing = batch_statistic_modules(model)
    if as_inputs(inputs).size == 1 and mixing:
        raise ValueError(
            f"inputs hold one sample, but {', '.join(mixing)} normalize with batch "
            "statistics (train mode or track_running_stats=False); pass a batch of at "
            "least 2 samples, or use running statistics (module.eval() on a model "
            "that tracks them)."
        )


def check_call(
    model: nn.Module,
    loss_func: object,
    inputs: object,
    params: Sequence[Tensor] | None,
    targets: object = None,
    batch_size: int | None = None,
) -> list[Tensor]:
    """All checks that need no forward pass; returns the resolved parameter list."""
    check_model(model)
    check_loss_func(loss_func)
    selected = resolve_params(model, params)
    view = check_inputs(inputs, selected, batch_size)
    if targets is not None:
        check_targets_early(targets, view, selected)
    check_batch_norm_batch_size(model, view)
    return selected


def check_chunk(chunk: int) -> None:
    """``chunk`` must be a positive int."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(
            f"chunk must be a positive int (columns per backward pass); got {chunk!r}."
        )


def check_rtol(rtol: float | None) -> None:
    """``rtol`` must be ``None`` or a finite real number ``≥ 0``."""
    if rtol is None:
        return
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)):
        raise TypeError(f"rtol must be a float or None; got {type(rtol).__name__}.")
    if not math.isfinite(rtol) or rtol < 0:
        raise ValueError(
            f"rtol must be finite and >= 0 (keep eigenvalues above rtol · λ_max); got "
            f"{rtol!r}. Pass None for the default: the eigenvalues the error model "
            "resolves to 1e-3 relative (N·C·eps·λ_max for ggn_spectrum_dataset's "
            "Lanczos solver)."
        )


def check_top_k(top_k: int | None) -> None:
    """``top_k`` must be ``None`` or a positive int."""
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1
    ):
        raise ValueError(f"top_k must be a positive int or None; got {top_k!r}.")


def check_options(
    *,
    chunk: int = 1,
    rtol: float | None = None,
    top_k: int | None = None,
    memory_budget: float | None = None,
) -> None:
    """Check the keyword options of a public function (all before any model call)."""
    check_chunk(chunk)
    check_rtol(rtol)
    check_top_k(top_k)
    resolve_memory_budget(memory_budget)
