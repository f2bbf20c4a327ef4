r"""The model linearised once around a batch, observed and within its memory budget.

:class:`LinearizedBatch` is what :class:`lowrank_ggn.GGN` derives its quantities
from: the checked call and its :class:`~lowrank_ggn.core.options.GGNOptions`, the
:class:`~lowrank_ggn.core.linearization.Linearization` built on first use, the guard
that every method call observes the model without changing it
(:func:`lowrank_ggn.core.state.model_preserved`, refusing a model changed in
place), the up-front memory check of each call (:mod:`lowrank_ggn.core.footprint`)
and the Gram matrices from the engine.

**Forward passes.** Building the linearisation (on the first call that needs it)
runs the model twice on the whole batch: once with the graph, recorded for the Gram
engine, and once as the determinism check; the path check evaluates four probe
samples one at a time and backpropagates once through the recorded graph. ``GGN(...)``, ``.spectrum(top_k=k, eigenvectors=True)``, ``.moments()`` and
``.directional_derivatives(eigenvectors)`` then take at most three forward passes
of the batch in all, plus the memory budget's probe of ``min(N, 4)`` samples
(:mod:`lowrank_ggn.core.footprint`; :attr:`LinearizedBatch.forward_passes` counts them); four on the
per-sample path when parameters outside ``Linear``/``Conv2d``/BatchNorm layers need
per-sample VJPs.

**Nothing changes.** The object observes the model: every method runs inside
:func:`lowrank_ggn.core.state.model_preserved`. It refuses to serve results after
the model's parameters or buffers were changed in place (an optimiser step): build a
new :class:`~lowrank_ggn.GGN` for the new parameters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lowrank_ggn.core.budget import check_linearization_memory
from lowrank_ggn.core.engine import EngineReport
from lowrank_ggn.core.engine.batchnorm import has_batch_norm
from lowrank_ggn.core.footprint import CallBudget, gram_parts
from lowrank_ggn.core.gram import gram_from_linearization
from lowrank_ggn.core.inputs import as_inputs
from lowrank_ggn.core.linearization import Linearization, linearize
from lowrank_ggn.core.loss_factors import num_factor_columns
from lowrank_ggn.core.losses.registry import resolve_loss
from lowrank_ggn.core.model import FunctionalModel
from lowrank_ggn.core.modes import PathName
from lowrank_ggn.core.options import GGNOptions
from lowrank_ggn.core.paths import EnginePath
from lowrank_ggn.core.precision import accumulation_dtype
from lowrank_ggn.core.resident import PeakMonitor
from lowrank_ggn.core.state import (
    fingerprint,
    model_preserved,
    refuse_changed,
    restored_fingerprint,
)
from lowrank_ggn.core.subsampling import check_subsampling
from lowrank_ggn.core.validation import check_call


class LinearizedBatch:
    """One batch's checked call, its lazy linearisation, and the guard of every call.

    Args:
        options: The call's options, built by
            :meth:`~lowrank_ggn.core.options.GGNOptions.of`.
        model, loss_func, inputs, targets, params, subsampling, batch_size: As for
            :class:`lowrank_ggn.GGN` (checked here, before any model call).
    """

    def __init__(
        self,
        options: GGNOptions,
        model: nn.Module,
        loss_func: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        params: Sequence[Tensor] | None,
        subsampling: Sequence[int] | Tensor | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.params = check_call(model, loss_func, inputs, params, targets, batch_size)
        inputs = as_inputs(inputs, batch_size)
        self.sample_index = (
            None
            if subsampling is None
            else check_subsampling(subsampling, inputs.size, inputs.device)
        )
        self.model, self.loss_func = model, loss_func
        self.inputs, self.targets, self.options = inputs, targets, options
        self._lin: Linearization | None = None
        self._report: EngineReport | None = None  # the last Gram's or Lanczos run's
        self._versions = fingerprint(model)
        self._observers = 0  # open _observing blocks (nested in one method call)
        self._budget = CallBudget(
            options.memory_budget,
            lambda: FunctionalModel(model, self.params, options.output),
            inputs,
            lambda shape: (
                options.mc_samples or num_factor_columns(resolve_loss(loss_func), shape)
            ),
            None if self.sample_index is None else len(self.sample_index),
            options.path is PathName.FULL_BATCH or has_batch_norm(model),
        )
        self._work = self._budget.budget  # bytes the engine may use (after check)

    @contextmanager
    def _observing(self) -> Iterator[None]:  # refuse a changed model; never change it
        outermost = not self._observers
        if outermost:  # the outermost block of a method call checks
            refuse_changed(self.model, self._versions, "GGN")  # one pass over D
        report = self.engine_report
        self._observers += 1
        try:
            with model_preserved(self.model), PeakMonitor() as peak:
                yield
        finally:  # the restore may bump versions; the values are the checked ones
            self._observers -= 1
            self._versions = restored_fingerprint(self.model, self._versions)
        new = self.engine_report
        if outermost and new is not None and new is not report:
            new.memory_peak = peak.peak  # the call that produced the report
            if self._budget.last is not None:
                new.memory_estimate = dict(self._budget.last.parts)
                new.memory_budget = self._budget.budget

    def _fit(self, streamed: bool = True, **parts) -> None:
        """Refuse before any forward pass of the batch unless the call fits the budget.

        ``parts``: :func:`~lowrank_ggn.core.footprint.gram_parts`' keywords (the
        method's Gram matrices, ``eigh``, eigenvectors); the engine then gets the
        bytes left (:mod:`lowrank_ggn.core.footprint`).
        """
        if not self._budget.bounded or self._observers > 1:
            return  # nested in a method that checked its own (larger) parts
        acc = accumulation_dtype(self._budget_dtype(), self.options.accumulate).itemsize
        generic = self.options.generic
        spec = gram_parts(self._budget.shape, acc_item=acc, generic=generic, **parts)
        self._work = self._budget.check(spec, streamed and not generic)

    def _budget_dtype(self) -> torch.dtype:
        return self.params[0].dtype if self.params else torch.get_default_dtype()

    @property
    def linearization(self) -> Linearization:
        """The linearisation (built on first use: two forward passes of the batch)."""
        if self._lin is None:
            with self._observing():
                self._lin = linearize(
                    self.model,
                    self.loss_func,
                    self.inputs,
                    self.targets,
                    self.params,
                    self.options,
                    self.sample_index,
                )
        return self._lin

    @property
    def path(self) -> EnginePath:
        """The engine's path (``.name``, ``.reason``, ``.mixing_modules``)."""
        return self.linearization.path

    @property
    def engine_report(self) -> EngineReport | None:
        """How the last Gram (or the Lanczos eigenpairs) was computed; ``None`` before."""
        return self._report

    @property
    def forward_passes(self) -> float:
        """Forward passes of the model so far, in full-batch equivalents (0 before).

        Includes the memory budget's probe of ``min(N, 4)`` samples.
        """
        probe = self._budget.probe_passes
        return probe if self._lin is None else self._lin.forward_passes + probe

    def _grams(self, groups: list[list[Tensor]] | None) -> list[Tensor]:
        lin = self.linearization
        check_linearization_memory(
            lin, self.options, 1 if groups is None else len(groups)
        )
        grams, self._report = gram_from_linearization(
            lin, self.options, self._work, groups
        )
        return grams


__all__ = ["LinearizedBatch"]
