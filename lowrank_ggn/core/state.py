r"""Observe a model without changing it: snapshot and restore its whole state.

Every public function of lowrank_ggn runs inside :func:`model_preserved`. On exit,
also when the call raises, the model's parameters, buffers (BatchNorm running
statistics and ``num_batches_tracked`` included), train/eval flags,
``requires_grad`` flags and existing ``.grad`` tensors are exactly as before.

Restoration writes only what changed. A parameter whose values did not move is not
touched, so its autograd version counter stays put and a graph the user built
before the call still backpropagates; values that did change are written back
through ``.data``, which leaves the version counter alone as well. Values are compared bit for bit (``-0.0`` and
``0.0``, or two NaN payloads, count as different). Parameters or buffers that a call
registers on a module are removed again. Plain Python attributes of modules (e.g. a
counter a custom ``forward`` increments) are not tracked.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowrank_ggn.core.memory import heap_reuse
from lowrank_ggn.core.validation import check_initialized


@dataclass
class _TensorSlot:
    """One entry of a module's ``_parameters`` or ``_buffers`` dictionary."""

    owner: nn.Module
    kind: str  # "_parameters" or "_buffers"
    name: str
    tensor: Tensor | None
    values: Tensor | None
    requires_grad: bool
    grad: Tensor | None
    grad_values: Tensor | None


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensor_bits(t: Tensor) -> Tensor:
    """``t`` reinterpreted as integers of the same width (bitwise comparison)."""
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype == torch.bool or t.element_size() not in _BITS:
        return t
    return t.view(_BITS[t.element_size()])


def _unchanged(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` still holds exactly ``b``'s bits (shape, dtype, device, values)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.device.type == "meta":  # no values to compare
        return True
    return bool(torch.equal(tensor_bits(a), tensor_bits(b)))


class ModelSnapshot:
    """A copy of everything about a module tree that lowrank_ggn promises to keep.

    Args:
        model: The module to snapshot. All sub-modules are included.

    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module; got {type(model).__name__}."
            )
        check_initialized(model)
        self._modes = [(m, m.training) for m in model.modules()]
        self._slots: list[_TensorSlot] = []
        self._names: list[tuple[nn.Module, str, set[str]]] = []
        for module in model.modules():
            for kind in ("_parameters", "_buffers"):
                store = getattr(module, kind)
                self._names.append((module, kind, set(store)))
                for name, tensor in store.items():
                    self._slots.append(self._slot(module, kind, name, tensor))

    @staticmethod
    def _slot(module: nn.Module, kind: str, name: str, t: Tensor | None) -> _TensorSlot:
        if t is None:
            return _TensorSlot(module, kind, name, None, None, False, None, None)
        grad = t.grad if kind == "_parameters" else None
        return _TensorSlot(
            owner=module,
            kind=kind,
            name=name,
            tensor=t,
            values=t.detach().clone(),
            requires_grad=t.requires_grad,
            grad=grad,
            grad_values=None if grad is None else grad.detach().clone(),
        )

    def restore(self) -> None:
        """Put every recorded flag, tensor and value back where it was."""
        for module, training in self._modes:
            if module.training != training:
                module.training = training
        for module, kind, names in self._names:
            store = getattr(module, kind)
            for added in [n for n in store if n not in names]:
                del store[added]
        with torch.no_grad():
            for s in self._slots:
                store = getattr(s.owner, s.kind)
                if store.get(s.name, None) is not s.tensor:
                    store[s.name] = s.tensor
                if s.tensor is None:
                    continue
                if not _unchanged(s.tensor, s.values):
                    # through .data: restoring the old values must not bump the
                    # version counter that a user's saved graph checks
                    s.tensor.data.copy_(s.values)
                if s.tensor.requires_grad != s.requires_grad:
                    s.tensor.requires_grad_(s.requires_grad)
                if s.kind == "_parameters":
                    if s.tensor.grad is not s.grad:
                        s.tensor.grad = s.grad
                    if s.grad is not None and not _unchanged(s.grad, s.grad_values):
                        s.grad.data.copy_(s.grad_values)


class AutocastDisabledWarning(UserWarning):
    """lowrank_ggn switched an active ``torch.autocast`` off for its computation."""


@contextmanager
def model_preserved(model: nn.Module) -> Iterator[None]:
    """Context in which ``model`` may be used freely; its state is restored on exit.

    Every lowrank_ggn entry point runs inside it. On CPU models freed large blocks
    stay on the C heap for reuse inside it (:func:`~lowrank_ggn.core.memory.heap_reuse`).
    ``torch.autocast`` on the
    parameters' device is switched off inside, with an
    :class:`AutocastDisabledWarning` if it was on: lowrank_ggn computes in the
    parameters' dtype (the GGN of autocast's lower-precision casts resolves no
    eigenvalue).

    Args:
        model: The module whose state must survive the block, also if it raises.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(3)
        >>> with model_preserved(bn):
        ...     _ = bn(torch.randn(4, 3))  # updates running statistics
        >>> assert bn.num_batches_tracked.item() == 0
        >>> assert torch.equal(bn.running_mean, torch.zeros(3))

    """
    snapshot = ModelSnapshot(model)
    first = next(iter(model.parameters()), None)
    device = first.device.type if first is not None else "cpu"
    if torch.is_autocast_enabled(device):
        warnings.warn(
            AutocastDisabledWarning(
                f"torch.autocast is active on {device}: lowrank_ggn evaluates the "
                "model in its parameters' dtype with autocast switched off. Call it "
                "outside the autocast region to silence this warning."
            ),
            stacklevel=3,
        )
    try:
        with torch.autocast(device, enabled=False), heap_reuse(device == "cpu"):
            yield
    finally:
        snapshot.restore()


def fingerprint(model: nn.Module) -> tuple:
    """Identity, storage, version and a value digest of every parameter and buffer.

    In-place changes through autograd (an optimizer step, a train-mode forward pass
    updating BatchNorm statistics) bump a tensor's version; writes that bypass it
    (``p.data.add_(…)``, ``p.data = …``, ``vector_to_parameters``) change its storage
    or values: the digest is the sum and the position-weighted sum of its entries in
    float64 (one pass over the parameters and buffers; any real update changes it).
    """
    tensors = [*model.parameters(), *model.buffers()]
    digests = []
    with torch.no_grad():
        for t in tensors:
            x = t.detach().reshape(-1).double()
            if x.numel() == 0 or not (x.is_floating_point() or x.is_complex()):
                digests.append(x.new_zeros(2))
                continue
            weights = torch.arange(1, x.numel() + 1, dtype=x.dtype, device=x.device)
            digests.append(torch.stack([x.sum(), (x * weights).sum()]))
    values = torch.stack(digests).cpu().tolist() if digests else []
    return tuple(
        # NaN != NaN: compare non-finite digests by their text
        (id(t), t._version, t.data_ptr(), tuple(t.shape), tuple(map(_comparable, v)))
        for t, v in zip(tensors, values)
    )


def _comparable(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def restored_fingerprint(model: nn.Module, before: tuple) -> tuple:
    """``before`` with the versions and storages as they are after a restore.

    :func:`model_preserved` writes the snapshot's values back (bumping versions, as a
    train-mode forward pass of a parametrised ``spectral_norm`` makes it do): the
    values equal those ``before`` describes, so its digests are kept and no pass over
    the parameters is needed.
    """
    tensors = [*model.parameters(), *model.buffers()]
    return tuple(
        (id(t), t._version, t.data_ptr(), tuple(t.shape), old[4])
        for t, old in zip(tensors, before)
    )


def refuse_changed(model: nn.Module, before: tuple, owner: str) -> None:
    """Raise if ``model`` changed since ``before = fingerprint(model)`` was taken."""
    if fingerprint(model) != before:
        raise RuntimeError(
            f"the model's parameters or buffers changed since this {owner} was "
            "created (e.g. an optimizer step): its linearisation belongs to the "
            f"old values. Create a new {owner}(model, ...) for the current ones."
        )
