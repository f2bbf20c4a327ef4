r"""Early, clear errors on bad input, before any heavy work starts.

Every check names the offending argument and says what to do instead. The public
functions call them in this order:

1. **Before the forward pass** (:func:`check_call`, :func:`check_options`): the
   model, the loss (only the built-in losses whose Hessian factors are exact and
   positive semi-definite; user-defined losses are refused), ``params``, the inputs
   (non-empty, finite, dtype and device of the parameters), the targets' type,
   device, batch size and finiteness, a batch of one under BatchNorm with batch
   statistics, and the options ``chunk``, ``rtol``, ``top_k``, ``memory_budget``.
2. **After the forward pass, before any backward pass**: finite outputs of batch size
   ``N`` (:func:`check_outputs`), targets that fit outputs and loss
   (:func:`lowrank_ggn.core.loss_factors.check_targets`), and the memory budget
   (:func:`check_memory`), from the sizes that the output shape determines; ``S`` is
   checked before it is formed, ``Vᵀ`` and the Gram matrix before the first backward
   pass.

**Memory budget.** A request is refused if the tensors it must hold together exceed
``memory_budget`` bytes: the Gram matrix (``(N·C)²`` entries, one per parameter
group), the loss-Hessian factors ``S`` (``C·N·O`` entries, ``O = Π out``) and, for
the generic engine only, the factor matrix ``Vᵀ`` (``N·C·D`` entries), times the
parameters' item size. The layer-wise engine bounds its factor blocks and column
chunks by the same budget while it runs. Workspace of ``eigh`` and of the backward
passes (about ``chunk`` columns at a time) comes on top. The default budget is :data:`DEFAULT_MEMORY_BUDGET` (4 GiB), overridden by the
environment variable ``LOWRANK_GGN_MEMORY_BUDGET`` (bytes, e.g. ``17179869184`` or
``16GiB``), overridden by the ``memory_budget=`` keyword. ``float("inf")`` disables it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lowrank_ggn.core.loss_factors import check_loss_func

#: Default memory budget in bytes for the tensors of one request (4 GiB).
DEFAULT_MEMORY_BUDGET = 4 * 2**30

#: Environment variable that overrides :data:`DEFAULT_MEMORY_BUDGET` (bytes).
MEMORY_BUDGET_ENV = "LOWRANK_GGN_MEMORY_BUDGET"

#: Parameter dtypes the engine computes in (``eigh`` and the zero threshold need them).
SUPPORTED_DTYPES = (torch.float32, torch.float64)

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


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


def check_inputs(inputs: Tensor, params: Sequence[Tensor]) -> None:
    """Raise if ``inputs`` are not a non-empty finite batch on the parameters' device.

    Floating-point inputs must also have the parameters' dtype; integer inputs (token
    indices) are accepted as they are.
    """
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
    if inputs.is_floating_point() or inputs.is_complex():
        if inputs.dtype != ref.dtype:
            raise ValueError(
                f"inputs have dtype {inputs.dtype} but the model parameters {ref.dtype}; "
                f"convert with inputs.to({ref.dtype})."
            )
        if not torch.isfinite(inputs).all():
            raise ValueError(
                "inputs contain NaN or Inf; clean the batch first (torch.isfinite)."
            )


def check_targets_early(
    targets: Tensor, inputs: Tensor, params: Sequence[Tensor]
) -> None:
    """What can be checked about ``targets`` before the forward pass.

    Type, device, batch size (``N`` of ``inputs``), dtype of floating targets and
    finiteness. Shapes that depend on the outputs are checked afterwards by
    :func:`lowrank_ggn.core.loss_factors.check_targets`.
    """
    if not isinstance(targets, Tensor):
        raise TypeError(
            f"targets must be a torch.Tensor; got {type(targets).__name__}. Convert "
            "with torch.as_tensor(targets)."
        )
    ref = params[0]
    if targets.device != ref.device:
        raise ValueError(
            f"targets are on {targets.device} but the model parameters on "
            f"{ref.device}; move them with targets.to({str(ref.device)!r})."
        )
    N = inputs.shape[0]
    if targets.dim() == 0 or targets.shape[0] != N:
        got = targets.shape[0] if targets.dim() else "none (a scalar)"
        raise ValueError(
            f"targets have batch size {got} but inputs have {N}; pass one target per "
            "input sample, batch in dim 0."
        )
    if targets.is_floating_point():
        if targets.dtype != ref.dtype:
            raise ValueError(
                f"targets have dtype {targets.dtype} but the model parameters "
                f"{ref.dtype}; convert with targets.to({ref.dtype})."
            )
        if not torch.isfinite(targets).all():
            raise ValueError(
                "targets contain NaN or Inf; clean the batch first (torch.isfinite)."
            )


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


def check_batch_norm_batch_size(model: nn.Module, inputs: Tensor) -> None:
    """BatchNorm with batch statistics is refused for a batch of one sample."""
    from lowrank_ggn.core.paths import batch_statistic_modules

    mixing = batch_statistic_modules(model)
    if inputs.shape[0] == 1 and mixing:
        raise ValueError(
            f"inputs hold one sample, but {', '.join(mixing)} normalize with batch "
            "statistics (train mode or track_running_stats=False); pass a batch of at "
            "least 2 samples, or use running statistics (module.eval() on a model "
            "that tracks them)."
        )


def check_call(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    params: Sequence[Tensor] | None,
    targets: Tensor | None = None,
) -> list[Tensor]:
    """All checks that need no forward pass; returns the resolved parameter list."""
    check_model(model)
    check_loss_func(loss_func)
    selected = resolve_params(model, params)
    check_inputs(inputs, selected)
    if targets is not None:
        check_targets_early(targets, inputs, selected)
    check_batch_norm_batch_size(model, inputs)
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
            f"rtol must be finite and >= 0 (relative zero threshold); got {rtol!r}. "
            "Pass None for the default N·C·eps."
        )


def check_top_k(top_k: int | None) -> None:
    """``top_k`` must be ``None`` or a positive int."""
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1
    ):
        raise ValueError(f"top_k must be a positive int or None; got {top_k!r}.")


def resolve_memory_budget(memory_budget: float | None = None) -> float:
    """The budget in bytes: ``memory_budget``, else the environment, else the default.

    Raises:
        ValueError: If the value (or ``LOWRANK_GGN_MEMORY_BUDGET``) is not a positive
            number of bytes.

    """
    if memory_budget is None:
        raw = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
        if not raw:
            return float(DEFAULT_MEMORY_BUDGET)
        match = re.fullmatch(r"([0-9.eE+]+)\s*([kKmMgGtT]?)(i?[bB])?", raw)
        try:
            value = float(match.group(1)) * _UNITS[match.group(2).lower()]
        except (AttributeError, ValueError):
            value = -1.0
        if not value > 0:
            raise ValueError(
                f"environment variable {MEMORY_BUDGET_ENV}={raw!r} is not a positive "
                "number of bytes; set e.g. 17179869184 or 16GiB."
            )
        return value
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)):
        raise TypeError(
            f"memory_budget must be a number of bytes or None; got "
            f"{type(memory_budget).__name__}."
        )
    if not memory_budget > 0:
        raise ValueError(
            f"memory_budget must be a positive number of bytes (float('inf') disables "
            f"the check); got {memory_budget!r}."
        )
    return float(memory_budget)


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


def _fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def check_memory(
    sizes: Mapping[str, int],
    itemsize: int,
    memory_budget: float | None = None,
    advice: str = "",
) -> None:
    """Raise a ``ValueError`` if tensors of ``sizes`` entries would exceed the budget.

    Args:
        sizes: Name of each tensor the request must hold (with its shape in words)
            -> its number of entries.
        itemsize: Bytes per entry (of the parameters' dtype).
        memory_budget: Bytes; ``None`` reads the environment or the default.
        advice: What to do instead, appended to the message.

    Example:
        >>> check_memory({"Gram [N·C, N·C]": 10**4}, 8, memory_budget=2**20)
        >>> import pytest
        >>> with pytest.raises(ValueError, match="exceeds the memory budget"):
        ...     check_memory({"Gram [N·C, N·C]": 10**6}, 8, memory_budget=2**20)

    """
    budget = resolve_memory_budget(memory_budget)
    total = sum(sizes.values()) * itemsize
    if total <= budget:
        return
    parts = ", ".join(f"{k}: {_fmt_bytes(v * itemsize)}" for k, v in sizes.items())
    raise ValueError(
        f"this request needs about {_fmt_bytes(total)} ({parts}), which exceeds the "
        f"memory budget of {_fmt_bytes(budget)}. {advice}Or raise the budget with "
        f"memory_budget=<bytes> or the environment variable {MEMORY_BUDGET_ENV}."
    )


def check_factor_memory(
    num_samples: int,
    num_columns_per_sample: int,
    num_outputs: int,
    itemsize: int,
    memory_budget: float | None = None,
) -> None:
    """The loss-Hessian factors ``S`` ``[C, N, *out]`` fit the budget."""
    N, C, O = num_samples, num_columns_per_sample, num_outputs  # noqa: E741
    check_memory(
        {f"loss-Hessian factors S [C={C}, N={N}, O={O}]": C * N * O},
        itemsize,
        memory_budget,
        "Use a smaller batch, or fewer output positions per sample. ",
    )


_GRAM_ADVICE = (
    "Use a smaller batch (or a subsample of it), fewer parameters (params=[...], "
    "one parameter group at a time), or Monte-Carlo factors (mc_samples) where "
    "available. "
)


def check_linearization_memory(
    lin,
    memory_budget: float | None = None,
    engine: str = "generic",
    num_grams: int = 1,
    gram_itemsize: int | None = None,
) -> None:
    """Budget check for a Gram request on a :class:`lowrank_ggn.core.linearization.Linearization`.

    Counts the ``num_grams`` Gram matrices ``[N·C, N·C]`` and the factors ``S``
    ``[C, N, *out]``, and for the generic engine ``Vᵀ`` ``[N·C, D]``, all alive while
    the Gram matrix is formed. (The layer-wise engine never holds ``Vᵀ``; it bounds
    its factor blocks by the same budget while it runs.) ``gram_itemsize``: bytes
    per Gram entry when it is summed in another dtype than the parameters'.
    """
    NC, D = lin.num_columns, lin.fmodel.num_params
    ratio = (gram_itemsize or lin.outputs.element_size()) / lin.outputs.element_size()
    C, S = lin.num_columns_per_sample, lin.factors.numel()
    parts = {f"loss-Hessian factors S [C={C}, N, *out]": S}
    if num_grams:
        gram = f"Gram matrix [{NC}, {NC}]"
        if num_grams > 1:
            gram = f"Gram matrices {num_grams} × [{NC}, {NC}]"
        parts[gram] = int(num_grams * NC * NC * ratio)
    if engine == "generic":
        parts[f"factors Vᵀ [N·C={NC}, D={D}]"] = NC * D
    check_memory(parts, lin.outputs.element_size(), memory_budget, _GRAM_ADVICE)
