r"""The memory budget: how many bytes one request may hold, checked before it holds them.

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

import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from lowrank_ggn.core.precision import accumulation_dtype

if TYPE_CHECKING:
    from lowrank_ggn.core.linearization import Linearization
    from lowrank_ggn.core.options import GGNOptions

#: Default memory budget in bytes for the tensors of one request (4 GiB).
DEFAULT_MEMORY_BUDGET = 4 * 2**30

#: Environment variable that overrides :data:`DEFAULT_MEMORY_BUDGET` (bytes).
MEMORY_BUDGET_ENV = "LOWRANK_GGN_MEMORY_BUDGET"



class MemoryBudgetExceeded(MemoryError, ValueError):
    """A call would hold more than ``memory_budget`` bytes; raised before it does.

    A ``MemoryError`` (what it is) and a ``ValueError`` (what budget refusals were
    before, so existing ``except ValueError`` blocks keep working). Fallbacks inside
    the package catch only this type, never a real out-of-memory ``MemoryError``.
    """


class MemoryBudgetWarning(UserWarning):
    """The budget forced a strategy much slower than the one that does not fit."""


_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


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


def fmt_bytes(n: float) -> str:
    """``n`` bytes in words (``'1.50 GiB'``)."""
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
    parts = ", ".join(f"{k}: {fmt_bytes(v * itemsize)}" for k, v in sizes.items())
    raise MemoryBudgetExceeded(
        f"this request needs about {fmt_bytes(total)} ({parts}), which exceeds the "
        f"memory budget of {fmt_bytes(budget)}. {advice}Or raise the budget with "
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
        "Use Monte-Carlo factors (mc_samples=M: M columns per sample), a smaller "
        "batch, or fewer output positions per sample. ",
    )


_GRAM_ADVICE = (
    "Use a smaller batch (or a subsample of it), fewer parameters (params=[...], "
    "one parameter group at a time), or Monte-Carlo factors (mc_samples) where "
    "available. "
)


def check_linearization_memory(
    lin: Linearization, options: GGNOptions, num_grams: int = 1
) -> None:
    """Budget check for a Gram request on a :class:`lowrank_ggn.core.linearization.Linearization`.

    Counts the ``num_grams`` Gram matrices ``[N·C, N·C]`` (in the accumulation dtype
    of ``options.accumulate``) and the factors ``S`` ``[C, N, *out]``, and for the
    generic engine (``options.generic``) ``Vᵀ`` ``[N·C, D]``, all alive while the
    Gram matrix is formed, against ``options.memory_budget``. (The layer-wise
    engine holds ``Vᵀ`` only in blocks — per layer, per chunk of columns — and sizes
    them by the same budget while it runs; the budget does not bound the autograd
    graph or library workspace.)
    """
    NC, D = lin.num_columns, lin.fmodel.num_params
    item = lin.outputs.element_size()
    acc = accumulation_dtype(lin.outputs.dtype, options.accumulate)
    ratio = acc.itemsize / item
    C, S = lin.num_columns_per_sample, lin.factors.numel()
    parts = {f"loss-Hessian factors S [C={C}, N, *out]": S}
    if num_grams:
        gram = f"Gram matrix [{NC}, {NC}]"
        if num_grams > 1:
            gram = f"Gram matrices {num_grams} × [{NC}, {NC}]"
        parts[gram] = int(num_grams * NC * NC * ratio)
    if options.generic:
        parts[f"factors Vᵀ [N·C={NC}, D={D}]"] = NC * D
    check_memory(parts, item, options.memory_budget, _GRAM_ADVICE)
