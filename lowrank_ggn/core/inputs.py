r"""Model inputs as people pass them: a tensor, a tuple (positional) or a dict (keywords).

A batch of ``N`` samples reaches the model as ``model(X)``, ``model(*X)`` for a tuple
or ``model(**X)`` for a dict. :class:`ModelInputs` is the one view of all three that
every stage uses:

* **split entries**: tensors whose dim 0 is the batch size ``N``; sample ``n`` is
  ``entry[n]``. Sub-sampling, per-sample evaluation (``vmap`` or batches of one) and
  the data-set functions index them;
* **shared entries**: everything else (tensors of another leading size, ``None``,
  Python values), passed unchanged to every call.

``N`` is ``batch_size`` when given, else dim 0 of the first tensor entry (in tuple or
dict order). Give ``batch_size`` when the first entry is not batched (e.g. a shared
table first). A shared tensor whose dim 0 happens to equal ``N`` would be split: bind
it into the model instead (a closure or ``functools.partial``).

Integer entries (token ids) and boolean masks are split like any other tensor; they
are never differentiated. Floating entries must have the parameters' dtype.

Targets use the same view (a tuple of targets is passed positionally after the
outputs, ``loss(outputs, *targets)``, e.g. ``GaussianNLLLoss``'s ``(target, var)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

Index = Tensor | Sequence[int] | slice


class ModelInputs:
    """A batch of model inputs: tensor, tuple or dict, with its split entries known.

    Args:
        raw: ``Tensor``, ``tuple``/``list`` (positional) or ``dict`` (keyword) inputs.
        batch_size: ``N``; default: dim 0 of the first tensor entry.
        name: The argument's name in error messages (``"inputs"`` or ``"targets"``).

    Raises:
        TypeError: For another container or a dict with non-string keys.
        ValueError: If no entry is a tensor with ``N`` rows, or ``N`` is 0.
    """

    def __init__(
        self, raw: Any, batch_size: int | None = None, name: str = "inputs"
    ) -> None:
        if isinstance(raw, ModelInputs):
            raw = raw.raw
        self.name = name
        if isinstance(raw, Tensor):
            self.kind, items = "tensor", [raw]
        elif isinstance(raw, (tuple, list)):
            self.kind, items = "tuple", list(raw)
        elif isinstance(raw, Mapping):
            if not all(isinstance(k, str) for k in raw):
                raise TypeError(
                    f"{name} given as a dict must have str keys (keyword arguments of "
                    "the model's forward); got keys "
                    f"{[type(k).__name__ for k in raw]}."
                )
            self.kind, items = "dict", list(raw.values())
        else:
            raise TypeError(
                f"{name} must be a torch.Tensor, a tuple (passed positionally) or a "
                f"dict (passed as keywords) with the batch in dim 0; got "
                f"{type(raw).__name__}."
            )
        self.keys = list(raw.keys()) if self.kind == "dict" else None
        self.items = items
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive int or None; got {batch_size!r}.")
        tensors = [t for t in items if isinstance(t, Tensor)]
        if batch_size is None:
            first = next((t for t in tensors), None)
            if first is None or first.dim() == 0:
                raise ValueError(
                    f"{name} must hold a tensor with the batch in dim 0 (the first "
                    "tensor entry defines the batch size); got "
                    + ("no tensor." if first is None else "a scalar first.")
                    + " Pass batch_size=N if the batch sits in a later entry."
                )
            batch_size = first.shape[0]
        self.size = int(batch_size)
        self.split = [
            isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == self.size
            for t in items
        ]
        if self.size == 0 or not any(self.split):
            raise ValueError(
                f"{name} must hold at least one sample: no tensor entry has "
                f"{self.size} rows in dim 0. Pass batch_size=N matching the batch."
            )

    # ------------------------------------------------------------------ access
    @property
    def raw(self) -> Any:
        """The inputs in their original container."""
        return self._rebuild(self.items)

    def _rebuild(self, items: list) -> Any:
        if self.kind == "tensor":
            return items[0]
        if self.kind == "dict":
            return dict(zip(self.keys, items))
        return tuple(items)

    def _like(self, items: list, size: int) -> ModelInputs:
        new = object.__new__(ModelInputs)
        new.name, new.kind, new.keys = self.name, self.kind, self.keys
        new.items, new.size, new.split = items, size, list(self.split)
        return new

    def call_args(self) -> tuple[tuple, dict]:
        """``(args, kwargs)`` for ``model(*args, **kwargs)``."""
        if self.kind == "dict":
            return (), dict(zip(self.keys, self.items))
        return tuple(self.items), {}

    @property
    def tensors(self) -> list[Tensor]:
        """The split entries, in order (each ``[N, …]``)."""
        return [t for t, s in zip(self.items, self.split) if s]

    def with_tensors(self, tensors: Sequence[Tensor], size: int | None = None) -> ModelInputs:
        """The same container with the split entries replaced (e.g. vmapped slices)."""
        it = iter(tensors)
        items = [next(it) if s else t for t, s in zip(self.items, self.split)]
        return self._like(items, self.size if size is None else size)

    def select(self, index: Index) -> ModelInputs:
        """The samples at ``index`` (a slice, index list or index tensor)."""
        if isinstance(index, slice):
            size = len(range(*index.indices(self.size)))
            return self.with_tensors([t[index] for t in self.tensors], size)
        if not isinstance(index, Tensor):
            index = torch.as_tensor(list(index), dtype=torch.long)
        picked = [t[index.to(t.device)] for t in self.tensors]
        return self.with_tensors(picked, int(index.numel()))

    def __getitem__(self, index: Index) -> ModelInputs:
        """``inputs[index]``: :meth:`select`."""
        return self.select(index)

    def unsqueezed(self) -> ModelInputs:
        """Inside ``vmap`` (entries are one sample each): a batch of one."""
        return self.with_tensors([t.unsqueeze(0) for t in self.tensors], 1)

    @property
    def device(self) -> torch.device:
        """Device of the first split entry."""
        return self.tensors[0].device

    def numel(self) -> int:
        """Entries in all split tensors (a memory estimate)."""
        return sum(t.numel() for t in self.tensors)

    def detached_clone(self) -> ModelInputs:
        """A copy whose tensors are detached clones (immune to later in-place edits)."""
        items = [t.detach().clone() if isinstance(t, Tensor) else t for t in self.items]
        return self._like(items, self.size)

    def to(self, dtype: torch.dtype) -> ModelInputs:
        """Every floating entry (split or shared) cast to ``dtype``; ids stay."""
        items = [
            t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
            for t in self.items
        ]
        return self._like(items, self.size)

    def first_float_dtype(self) -> torch.dtype | None:
        """Dtype of the first floating split entry, if any."""
        return next((t.dtype for t in self.tensors if t.is_floating_point()), None)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        shapes = [
            tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            for t in self.items
        ]
        return f"ModelInputs({self.kind}, N={self.size}, entries={shapes})"


def as_inputs(raw: Any, batch_size: int | None = None, name: str = "inputs") -> ModelInputs:
    """``raw`` as :class:`ModelInputs` (unchanged if it already is one)."""
    if isinstance(raw, ModelInputs) and batch_size in (None, raw.size):
        return raw
    return ModelInputs(raw, batch_size, name)


def batch_size_of(raw: Any, batch_size: int | None = None) -> int:
    """``N`` of ``raw`` inputs (see :class:`ModelInputs`)."""
    return as_inputs(raw, batch_size).size


def detached_clone(obj: Any) -> Any:
    """Detached clones of a tensor, or of the tensors in a tuple/list/dict."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, ModelInputs):
        return obj.detached_clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(detached_clone(t) for t in obj)
    if isinstance(obj, Mapping):
        return {k: detached_clone(v) for k, v in obj.items()}
    return obj


def check_entries(inputs: ModelInputs, ref: Tensor) -> None:
    """Every tensor entry is on ``ref``'s device; floating ones have its dtype, finite.

    Raises:
        ValueError: Naming the entry and the fix.
    """
    labels = (
        [f"{inputs.name}[{k!r}]" for k in inputs.keys]
        if inputs.kind == "dict"
        else [inputs.name]
        if inputs.kind == "tensor"
        else [f"{inputs.name}[{i}]" for i in range(len(inputs.items))]
    )
    # a whole tensor argument reads as plural ("inputs are"), an entry singular
    are, has, contains = (
        ("are", "have", "contain") if inputs.kind == "tensor" else ("is", "has", "contains")
    )
    for label, t in zip(labels, inputs.items):
        if not isinstance(t, Tensor):
            continue
        fix = label if inputs.kind == "tensor" else "it"
        if t.device != ref.device:
            raise ValueError(
                f"{label} {are} on {t.device} but the model parameters on {ref.device}; "
                f"move {fix} with {label}.to({str(ref.device)!r})."
            )
        if t.is_floating_point() or t.is_complex():
            if t.dtype != ref.dtype:
                raise ValueError(
                    f"{label} {has} dtype {t.dtype} but the model parameters "
                    f"{ref.dtype}; convert with {label}.to({ref.dtype})."
                )
            if not torch.isfinite(t).all():
                raise ValueError(
                    f"{label} {contains} NaN or Inf; clean the batch first "
                    "(torch.isfinite)."
                )


__all__ = ["ModelInputs", "as_inputs", "batch_size_of", "check_entries", "detached_clone"]
