r"""The memory of a whole call, estimated before its forward pass and measured during it.

``memory_budget`` bounds the bytes a call holds *above what the process held when it
started* (the model, the data and the caller's own tensors are the caller's). The
estimate adds, at the call's peak:

===========================  ==========================================================
part                         bytes
===========================  ==========================================================
model snapshot               parameters and buffers (the state restored afterwards),
                             plus one float64 copy of the largest tensor (its digest)
autograd graph               tensors saved for backward by a probe forward pass of
                             ``k = min(N, 4)`` samples, times ``N/k``, times
                             :data:`GRAPH_MARGIN` (the capture's records, BatchNorm's
                             recomputation); plus ``N·O`` outputs
backward pass                half the graph (activation gradients) plus ``D``
                             (parameter gradients of one vector-Jacobian product)
factors ``S``                ``C·N·O`` (and the loss's outputs)
Gram matrices                ``2·g·(N·C)²`` in the accumulation dtype (each and its
                             symmetrised copy)
``eigh``                     ``6·(N·C)²``: the input copy, the eigenvectors, LAPACK's
                             ``2·(N·C)²`` work space, the descending copy, the error
                             model's temporary
eigenvectors                 ``2·K·D`` for ``K`` requested eigenvectors
generic engine               ``Vᵀ`` ``[N·C, D]``
===========================  ==========================================================

times the item size. What is left, the *work budget*, is what the layer-wise engine
may hold for its strategy (:mod:`lowrank_ggn.core.engine.plan`: factor rows, per-sample
rows of uncaptured parameters, chunk buffers); ``streamed`` needs only
``graph + |B|·D`` for a block of ``|B| ≥ 1`` columns, so a call is refused up front,
before its forward pass, only when the parts above plus that minimum exceed the budget.
The refusal lists the parts and the largest batch that would fit.

The *measured* peak (:class:`~lowrank_ggn.core.resident.PeakMonitor`) is the
process's resident set size above its value at the start of the call, reported in
:attr:`lowrank_ggn.core.engine.EngineReport.memory_peak` next to the estimate.
``tests/test_memory_budget.py`` measures peak minus baseline in child processes and
holds it to ``budget + slack`` (slack: allocator and library work space, stated there).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lowrank_ggn.core.budget import MemoryBudgetExceeded, fmt_bytes
from lowrank_ggn.core.resident import (  # re-exported: experiments and tests
    PeakMonitor,
    peak_resident_bytes,
    reset_peak_resident,
    resident_bytes,
)
from lowrank_ggn.core.state import model_preserved
from lowrank_ggn.core.validation import check_params_finite

#: Saved tensors of the probe, scaled to ``N``, are multiplied by this: the capture
#: keeps layer inputs/outputs beside the graph and recomputes BatchNorm.
GRAPH_MARGIN = 1.5

#: Samples of the probe forward pass (at least 2 where ``N ≥ 2``: BatchNorm).
PROBE_SAMPLES = 4


def graph_bytes(
    fmodel, inputs, with_bns: bool | None = None
) -> tuple[float, torch.Size]:
    """Bytes the recorded forward pass of the whole batch holds; the output's ``out``.

    One forward pass of the first ``k = min(N, 4)`` samples, recorded as the Gram
    engine records the batch (``with_bns``: BatchNorm statistics as nodes; ``None``:
    no capture), collects the storages of the tensors autograd saves and of those
    the capture keeps (layer inputs, outputs, operands such as convolution patches),
    not those of parameters or buffers; their bytes are scaled by ``N/k`` (an
    over-estimate for parts that do not grow with ``N``).
    """
    N = inputs.size
    k = min(N, PROBE_SAMPLES)
    owned = {
        t.untyped_storage().data_ptr()
        for t in list(fmodel.model.parameters()) + list(fmodel.model.buffers())
    }
    seen: dict[int, int] = {}

    def count(t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, nested, …
            return t
        ptr = storage.data_ptr()
        if ptr not in owned:  # a view counts its own bytes, at most its storage's
            size = min(t.numel() * t.element_size(), storage.nbytes())
            seen[ptr] = max(seen.get(ptr, 0), size)
        return t

    cap = None
    if with_bns is not None:
        from lowrank_ggn.core.engine.capture import ForwardCapture

        cap = ForwardCapture(fmodel.model, {id(p) for p in fmodel.params}, with_bns)
    probe = inputs.select(slice(0, k))
    hooks = torch.autograd.graph.saved_tensors_hooks(count, _same)
    with torch.enable_grad(), hooks, cap.recording(k) if cap else nullcontext():
        out = fmodel(tuple(fmodel.params), probe)
    count(out)
    if cap is not None:
        _walk([cap.layers, cap.bns], count, set())
    shape = out.shape[1:]
    del out, cap
    return sum(seen.values()) * N / k, shape


def _walk(obj: object, count, visited: set[int]) -> None:
    """Apply ``count`` to every tensor reachable from ``obj`` (containers, records)."""
    if id(obj) in visited or isinstance(obj, (nn.Module, str, bytes, int, float)):
        return
    visited.add(id(obj))
    if isinstance(obj, Tensor):
        count(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _walk(v, count, visited)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _walk(v, count, visited)
    elif hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            _walk(v, count, visited)
    elif hasattr(obj, "__slots__"):
        for name in obj.__slots__:
            _walk(getattr(obj, name, None), count, visited)


def _same(t: Tensor) -> Tensor:
    return t


@dataclass
class Footprint:
    """The parts of one call's peak, in bytes, and the budget they must fit.

    ``scale`` maps each part to how it grows with ``N`` (``1``: linear, ``2``:
    quadratic, ``0``: constant), for :meth:`largest_batch`.
    """

    budget: float
    parts: dict[str, float] = field(default_factory=dict)
    scale: dict[str, int] = field(default_factory=dict)
    N: int = 1

    def extended(self, parts: dict[str, tuple[float, int]]) -> Footprint:
        """A copy with more ``name -> (bytes, power)`` parts."""
        out = Footprint(self.budget, dict(self.parts), dict(self.scale), self.N)
        for name, (nbytes, power) in parts.items():
            out.add(name, nbytes, power)
        return out

    def add(self, name: str, nbytes: float, power: int) -> None:
        """Add a part of ``nbytes`` that grows like ``N**power``."""
        self.parts[name] = float(nbytes)
        self.scale[name] = power

    @property
    def total(self) -> float:
        """The estimated peak above the call's start."""
        return sum(self.parts.values())

    @property
    def work(self) -> int:
        """What the budget leaves for the engine's strategy (may be negative)."""
        return int(min(self.budget - self.total, 2**62))

    def largest_batch(self, minimum: dict[str, tuple[float, int]] | None = None) -> int:
        """The largest ``N' ≤ N`` whose parts (plus ``minimum``'s) fit the budget (0: none)."""
        parts = {k: (b, self.scale[k]) for k, b in self.parts.items()}
        parts.update(minimum or {})

        def need(n: int) -> float:
            return sum(b * (n / self.N) ** power for b, power in parts.values())

        lo, hi = 0, self.N
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if need(mid) <= self.budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def refuse(self, minimum: dict[str, tuple[float, int]], advice: str) -> None:
        """Raise :class:`MemoryBudgetExceeded` unless the parts plus ``minimum`` fit.

        ``minimum``: ``name -> (bytes, power)``, the least the engine's work needs.
        """
        parts = dict(self.parts)
        parts.update({k: b for k, (b, _) in minimum.items()})
        total = sum(parts.values())
        if total <= self.budget:
            return
        listed = "; ".join(f"{k}: {fmt_bytes(v)}" for k, v in parts.items() if v > 0)
        fits = self.largest_batch(minimum)
        batch = (
            f"a batch of at most {fits} samples (subsampling=..., or a smaller batch)"
            if fits
            else "no batch size (the model alone is too large for it)"
        )
        raise MemoryBudgetExceeded(
            f"this call needs about {fmt_bytes(total)} above the process's memory at "
            f"its start ({listed}), more than memory_budget={fmt_bytes(self.budget)}. "
            f"The budget fits {batch}. {advice}Or raise memory_budget (bytes) or the "
            "environment variable LOWRANK_GGN_MEMORY_BUDGET."
        )


@dataclass
class CallShape:
    """What a call's memory depends on, from the probe: sizes in entries, item sizes."""

    N: int  # samples in the batch
    NC: int  # Gram columns (kept samples times factor columns)
    D: int  # selected parameters
    O: int  # outputs per sample  # noqa: E741
    C: int  # factor columns per sample
    item: int  # bytes per entry in the parameters' dtype
    graph: float  # bytes of the recorded forward pass (scaled, with margin)


def base_footprint(
    fmodel, inputs, C_of, kept: int | None, with_bns: bool, budget: float
) -> tuple[Footprint, CallShape]:
    """The parts every call holds (model snapshot, recorded pass, factors), and its shape.

    Args:
        fmodel: The :class:`~lowrank_ggn.core.model.FunctionalModel`.
        inputs: The batch (:class:`~lowrank_ggn.core.inputs.ModelInputs`).
        C_of: Maps the output shape ``[N, *out]`` to the factor columns per sample.
        kept: Samples whose curvature is kept (sub-sampling), ``None``: all.
        with_bns: Whether the capture records BatchNorm statistics.
        budget: ``memory_budget`` in bytes.
    """
    graph, out = graph_bytes(fmodel, inputs, with_bns)
    N = inputs.size
    item = fmodel.params[0].element_size() if fmodel.params else 4
    D = fmodel.num_params
    O = math.prod(out)  # noqa: E741
    C = int(C_of(torch.Size((N, *out))))
    shape = CallShape(N, (N if kept is None else kept) * C, D, O, C, item, graph)
    fp = Footprint(budget, N=N)
    fp.add("model snapshot and digest", snapshot_bytes(fmodel.model), 0)
    fp.add("recorded forward pass (probe, scaled)", GRAPH_MARGIN * graph, 1)
    fp.add(
        "path check (per-sample gradients of 4 probes, one of the batch)",
        5 * D * item,
        0,
    )
    fp.add("one backward pass (activation gradients)", graph / 2, 1)
    fp.add(f"outputs and factors S [C={C}, N, O={O}]", (C + 2) * N * O * item, 1)
    return fp, shape


def streamed_minimum(shape: CallShape) -> dict[str, tuple[float, int]]:
    """The least any strategy holds: ``streamed`` with one-column blocks.

    Its traced linearisation (about one more recorded pass) and one column of
    directions, products and gradients (``4·D``).
    """
    return {
        "streamed: traced linearisation": (shape.graph, 1),
        "streamed: one column block [1, D]": (4 * shape.D * shape.item, 0),
    }


_ADVICE = (
    "Use Monte-Carlo factors (mc_samples=M), sub-sampling (subsampling=[...]), "
    "fewer parameters (params=[...]) or fewer eigenvectors. "
)


class CallBudget:
    """The memory budget of one :class:`~lowrank_ggn.GGN`: one probe, a check per method.

    :meth:`check` adds a method's own parts (Gram matrices, ``eigh``, eigenvectors,
    ``Vᵀ``) to the parts every call holds, refuses with
    :class:`~lowrank_ggn.core.budget.MemoryBudgetExceeded` before the batch's
    forward pass if they (plus ``streamed``'s minimum, for the layer-wise engine)
    exceed the budget, and returns the work budget the engine may use.
    ``memory_budget=inf`` skips the probe: nothing is bounded.
    """

    def __init__(self, budget: float, fmodel_of, inputs, C_of, kept, with_bns) -> None:
        self.budget = budget
        self._args = (fmodel_of, inputs, C_of, kept, with_bns)
        self._base: tuple[Footprint, CallShape] | None = None
        self.last: Footprint | None = None

    @property
    def bounded(self) -> bool:
        """Whether the budget is finite."""
        return math.isfinite(self.budget)

    @property
    def probe_passes(self) -> float:
        """The probe's forward pass in full-batch equivalents (0 before it ran)."""
        if self._base is None:
            return 0.0
        return min(self.shape.N, PROBE_SAMPLES) / self.shape.N

    @property
    def shape(self) -> CallShape:
        """The probe's :class:`CallShape` (runs the probe once)."""
        if self._base is None:
            fmodel_of, inputs, C_of, kept, with_bns = self._args
            fmodel = fmodel_of()
            check_params_finite(fmodel.params, fmodel.names)  # before any pass
            with model_preserved(fmodel.model):  # e.g. spectral_norm's power step
                self._base = base_footprint(
                    fmodel, inputs, C_of, kept, with_bns, self.budget
                )
        return self._base[1]

    def check(self, parts: dict[str, tuple[float, int]], streamed: bool) -> int:
        """Refuse unless the call fits; return the bytes left for the engine's work."""
        if not self.bounded:
            return 2**62
        self.shape  # noqa: B018 (runs the probe)
        fp = self._base[0].extended(parts)
        fp.refuse(streamed_minimum(self.shape) if streamed else {}, _ADVICE)
        self.last = fp
        return max(1, fp.work)


def gram_parts(
    shape: CallShape,
    *,
    grams: int = 1,
    acc_item: int = 8,
    eigh: bool = False,
    eigenvectors: int = 0,
    generic: bool = False,
) -> dict[str, tuple[float, int]]:
    """The parts a Gram method adds: ``grams`` Gram matrices, ``eigh``, ``Vᵀ``, ``K`` vectors."""
    NC2 = shape.NC**2 * acc_item
    # each Gram and its symmetrised copy ((G + Gᵀ)/2); eigh: LAPACK's input copy,
    # eigenvectors, 2·n² work space (syevd), the descending copy, the error model's
    parts = {f"Gram matrices {grams} × [{shape.NC}, {shape.NC}]": (2 * grams * NC2, 2)}
    if eigh:
        parts["eigh: copy, eigenvectors, work space"] = (6 * NC2, 2)
    if generic:
        parts[f"factors Vᵀ [{shape.NC}, {shape.D}]"] = (
            shape.NC * shape.D * shape.item,
            1,
        )
    if eigenvectors:
        K = min(eigenvectors, shape.NC)
        parts[f"eigenvectors [{K}, {shape.D}] and their product"] = (
            2 * K * shape.D * shape.item,
            0,
        )
    return parts


def snapshot_bytes(model: nn.Module) -> float:
    """Bytes of the state snapshot plus the digest's largest float64 copy."""
    tensors = [t for t in list(model.parameters()) + list(model.buffers())]
    total = sum(t.numel() * t.element_size() for t in tensors)
    largest = max((t.numel() for t in tensors), default=0)
    return float(total + 8 * largest)


__all__ = [
    "GRAPH_MARGIN",
    "CallBudget",
    "CallShape",
    "Footprint",
    "PeakMonitor",
    "base_footprint",
    "graph_bytes",
    "gram_parts",
    "peak_resident_bytes",
    "reset_peak_resident",
    "resident_bytes",
    "snapshot_bytes",
    "streamed_minimum",
]
