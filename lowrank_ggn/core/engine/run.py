r"""The layer-wise Gram engine: capture, plan, backpropagate, check, assemble.

``𝒢 = Vᵀ V = Σ_p V_pᵀ V_p`` is a sum over parameter blocks. One forward pass
captures each layer's input and output (:mod:`~lowrank_ggn.core.engine.capture`, BatchNorm
statistics as graph nodes: :mod:`~lowrank_ggn.core.engine.batchnorm`); the cost
model picks a strategy (:mod:`~lowrank_ggn.core.engine.plan`); backward passes find each
column's layer-output gradients (:mod:`~lowrank_ggn.core.engine.backprop`, or the streamed
products of :mod:`~lowrank_ggn.core.engine.streamed`); a random ``V w`` is checked against
autograd (:mod:`~lowrank_ggn.core.engine.selfcheck`); each block is added in its cheapest
exact form (:mod:`~lowrank_ggn.core.engine.assemble`, with the forms of
:mod:`~lowrank_ggn.core.engine.operands` and :mod:`~lowrank_ggn.core.engine.accumulate`).
Which modules are captured: :mod:`~lowrank_ggn.core.engine.layers`; a ``Linear``
subclass with its own ``forward`` whose self-check fails is left generic and the
engine runs again. Under ``BN_SPLIT`` a block is ``V_p = V_{f,p} + B_p W`` (frozen
per-sample rows plus statistics directions).

This module only orchestrates: it runs the stages in order, and runs them again
(:func:`run_engine`; :func:`layerwise_gram` ends in the Grams, :mod:`.rows` in
``Vᵀ``) with a layer found to mix samples treated as mixing, with
layers captured on trust left generic after a failed self-check, or with another
strategy when ``bn_split`` fails its self-check or ``columns`` exceeds the budget.

**Precision.** Backward passes run in the parameters' dtype; the Gram is summed in
``acc_dtype`` (float64 from float32 factors by default): every block is cast to it
before its products (:mod:`lowrank_ggn.core.precision` for the error model).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor

from lowrank_ggn.core.budget import MemoryBudgetExceeded
from lowrank_ggn.core.engine.assemble import assemble_grams, held_bytes
from lowrank_ggn.core.engine.backprop import (
    AUTOGRAD_OVERHEAD,
    LayerTurnedMixing,
    column_passes,
    frozen_passes,
    per_sample_generic_rows,
    statistics_directions,
)
from lowrank_ggn.core.engine.batchnorm import has_batch_norm
from lowrank_ggn.core.engine.capture import Captured, ForwardCapture
from lowrank_ggn.core.engine.layer import Layer
from lowrank_ggn.core.engine.plan import plan_strategy, split_shape
from lowrank_ggn.core.engine.report import EngineReport
from lowrank_ggn.core.engine.selfcheck import Factors, self_check
from lowrank_ggn.core.engine.streamed import streamed_gram
from lowrank_ggn.core.engine.unavailable import (
    LayerwiseUnavailable,
    SelfCheckFailed,
    StrategyUnavailable,
)
from lowrank_ggn.core.modes import Strategy
from lowrank_ggn.core.paths import PER_SAMPLE
from lowrank_ggn.core.progress import Tick

if TYPE_CHECKING:
    from lowrank_ggn.core.linearization import Linearization

T = TypeVar("T")


def _no_tick(n: int) -> None:
    return None


class _Engine:
    """One layer-wise Gram computation for a :class:`Linearization`.

    :meth:`forward` returns the :class:`Captured` pass that :meth:`plan`,
    :meth:`backward` and :meth:`run` take; the engine keeps only its report.
    """

    def __init__(
        self,
        lin,
        chunk,
        budget,
        groups,
        forced,
        forced_mixing,
        tick,
        acc_dtype=None,
        excluded=frozenset(),
    ):
        self.lin, self.chunk, self.budget, self.tick = lin, max(1, chunk), budget, tick
        self.acc = lin.outputs.dtype if acc_dtype is None else acc_dtype
        self.groups = groups
        self.forced = forced
        self.per_sample = lin.path.name == PER_SAMPLE
        # per-sample path: BatchNorm (then eval-mode) affine rows from frozen passes
        want_bns = has_batch_norm(lin.fmodel.model)
        cap = lin.take_capture()  # one engine run consumes a capture
        if (
            cap is None
            or cap.done
            and (
                cap.with_bns != want_bns
                or cap.forced_mixing != forced_mixing
                or cap.excluded != excluded
            )
        ):
            selected = {id(p) for p in lin.fmodel.params}
            cap = ForwardCapture(
                lin.fmodel.model, selected, want_bns, forced_mixing, excluded
            )
        self.cap = cap
        self.report = EngineReport(Strategy.COLUMNS)

    # ----------------------------------------------------------------- forward
    def forward(self) -> Captured:
        """The captured forward pass: the linearisation's, or a new one if needed."""
        cap = self.cap
        if cap.done and self.lin.graph is not None:
            out = self.lin.graph
        else:
            with cap.recording(self.lin.batch_size):
                out = self.lin.forward_with_graph()
            self.report.count("forward")
        self.report.reasons.update(cap.rejected)
        return Captured.of(out, cap, self.lin.fmodel.params)

    def plan(self, c: Captured) -> Strategy:
        """The forced strategy (checked), or the cost model's choice."""
        lin = self.lin
        plan = plan_strategy(
            per_sample=self.per_sample,
            NC=lin.num_columns,
            C=lin.num_columns_per_sample,
            layers=c.layers,
            bns=c.bns,
            order=c.cap.order,
            generic_numel=sum(p.numel() for p in c.non_bn_generic),
            item=lin.outputs.element_size(),
            budget=self.budget,
        )
        self.report.estimated_passes = plan.estimates
        if self.forced is None:
            self.report.reason = plan.reason
            self._start_progress(plan.strategy, c)
            return plan.strategy
        if self.forced is Strategy.PER_SAMPLE and not self.per_sample:
            raise StrategyUnavailable(
                "strategy='per_sample' is invalid for this model: its forward pass "
                f"mixes samples ({lin.path.reason}). Use strategy=None."
            )
        if self.forced is Strategy.BN_SPLIT and c.non_bn_generic:
            names = [
                n
                for n, p in zip(lin.fmodel.names, lin.fmodel.params)
                if any(p is q for q in c.non_bn_generic)
            ]
            raise StrategyUnavailable(
                "strategy='bn_split' needs every parameter in a captured layer "
                "(lowrank_ggn.core.engine.layers) or a BatchNorm module; "
                f"{', '.join(names[:4])} are not. Use strategy=None."
            )
        plan.check_memory(self.forced, self.budget)
        self.report.reason = f"forced by strategy={self.forced.value!r}"
        self._start_progress(self.forced, c)
        return self.forced

    def _start_progress(self, strategy: Strategy, c: Captured) -> None:
        lin, est = self.lin, self.report.estimated_passes
        total = {
            Strategy.PER_SAMPLE: lin.num_columns_per_sample,
            Strategy.BN_SPLIT: lin.num_columns_per_sample
            + sum(bn.num_statistics for bn in c.bns),
        }.get(strategy, lin.num_columns)
        passes = est.get(strategy, 2.0 * lin.num_columns)
        seconds_per_pass = 2 * max(c.cap.seconds, 1e-4)
        start = getattr(self.tick, "start", None)
        if start is not None:
            start(total, passes * seconds_per_pass)

    # ---------------------------------------------------------------- backward
    def _check_budget(self, layers: list[Layer]) -> None:
        held = sum(
            t.numel() * t.element_size()
            for la in layers
            for t in la.explicit + la.grads
        )
        if held > self.budget:
            raise MemoryBudgetExceeded(
                f"the layer-wise Gram engine needs more than memory_budget="
                f"{self.budget / 2**30:.2f} GiB for the factor blocks of "
                f"N·C={self.lin.num_columns} columns; raise memory_budget, or reduce "
                "the batch, use mc_samples/subsampling, or restrict params."
            )

    def backward(self, c: Captured, strategy: Strategy) -> Factors:
        """Run the strategy's backward passes; return what the Gram is built from."""
        lin, report, out, layers, bns = self.lin, self.report, c.out, c.layers, c.bns
        if strategy in (Strategy.PER_SAMPLE, Strategy.BN_SPLIT):
            with c.cap.switch.freeze():
                frozen_passes(lin, out, layers, bns, report, self.tick)
            if strategy is Strategy.PER_SAMPLE:  # no statistics: frozen is exact
                rows = per_sample_generic_rows(lin, c.non_bn_generic, self.chunk)
                return Factors(
                    lin, layers, bns, generic=c.non_bn_generic, generic_rows=rows
                )
            stat_bns = [bn for bn in bns if bn.batch_stats]
            below, _ = split_shape(layers, bns, c.cap.order)
            in_layers = {id(p) for la in layers for p in la.params}
            others = [p for p in lin.fmodel.params if id(p) not in in_layers]
            B, starts = statistics_directions(
                stat_bns, layers, others, below, self.budget, report, self.tick
            )
            W = torch.cat([bn.coefficients() for bn in stat_bns]) if stat_bns else None
            return Factors(lin, layers, bns, W, B, B_starts=starts)
        acts = sum(la.outputs[0].numel() for la in layers) + out.numel()
        per_column = AUTOGRAD_OVERHEAD * acts * out.element_size()
        chunk = max(1, min(self.chunk, (self.budget // 4) // max(1, per_column)))
        rows = column_passes(
            lin,
            out,
            layers,
            c.generic,
            chunk,
            lambda: self._check_budget(layers),
            report,
            self.tick,
        )
        owners = {id(p): bn.name for bn in bns for p in bn.params}
        return Factors(lin, layers, generic=c.generic, generic_rows=rows, owners=owners)

    # ------------------------------------------------------------------- main
    def run(self, c: Captured, strategy: Strategy, assemble=assemble_grams) -> T:
        """``assemble(factors, groups, acc_dtype, budget, treatments)``: the Grams.

        Raises:
            SelfCheckFailed: The factors' ``V w`` differs from autograd's.
        """
        self.report.strategy = strategy
        if strategy is Strategy.STREAMED:
            return streamed_gram(
                self.lin,
                self.budget,
                self._masks(),
                self.report,
                self.tick,
                (c.out, c.layers),
                self.acc,
            )
        f = self.backward(c, strategy)
        bad = self_check(f, self.cap.precision)
        if bad:
            raise SelfCheckFailed(self.report, bad)
        # the assembly's chunks get what the strategy's factors leave of the budget
        left = max(self.budget - held_bytes(f), self.budget // 16)
        return assemble(f, self.groups, self.acc, left, self.report.layers)

    def _masks(self) -> list[Tensor] | None:
        if len(self.groups) == 1:
            return None
        fm = self.lin.fmodel
        masks = []
        for members in self.groups:
            ids = {id(p) for p in members}
            masks.append(
                fm.flatten(
                    [torch.full_like(p, float(id(p) in ids)) for p in fm.params]
                ).detach()
            )
        return masks


def layerwise_gram(
    lin: Linearization,
    chunk: int = 64,
    memory_budget: int = 4 * 2**30,
    groups: list[list[Tensor]] | None = None,
    strategy: Strategy | None = None,
    tick: Tick | None = None,
    acc_dtype: torch.dtype | None = None,
) -> tuple[list[Tensor] | None, EngineReport]:
    """Gram matrices of ``lin`` (see module docstring).

    Args:
        lin: The linearised model.
        chunk: Columns per batched backward pass (strategy ``columns``).
        memory_budget: Bytes for factor blocks and work buffers.
        groups: A partition of ``lin.fmodel.params``; one Gram ``V_gᵀ V_g`` per group,
            all from the same backward passes. Default: one group of all parameters.
        strategy: Force a :class:`Strategy` (``None``: the cost model chooses).
        tick: Called with the number of passes done, for a progress bar.
        acc_dtype: dtype the Gram is summed in (``None``: the parameters' dtype).

    Returns:
        ``(grams, report)``: one ``[NC, NC]`` Gram per group and the
        :class:`EngineReport`.

    Raises:
        StrategyUnavailable: A forced strategy does not apply to the model.
        SelfCheckFailed: No strategy's factors passed the self-check (the caller
            then uses the generic engine); ``.report`` is the last run's.
    """
    finish = _Engine.run  # (engine, captured, strategy) -> the Grams
    return run_engine(
        lin, finish, chunk, memory_budget, strategy, groups, tick, acc_dtype
    )


def run_engine(
    lin: Linearization,
    finish: Callable[[_Engine, Captured, Strategy], T],
    chunk: int,
    memory_budget: int,
    strategy: Strategy | None = None,
    groups: list[list[Tensor]] | None = None,
    tick: Tick | None = None,
    acc_dtype: torch.dtype | None = None,
) -> tuple[T, EngineReport]:
    """Forward, plan, then ``finish(engine, captured, strategy)``, run again as needed.

    ``finish`` runs the strategy's backward passes and self-check and returns what the
    caller builds from the factors (the Grams; ``Vᵀ`` in :mod:`.rows`). The runs again
    are those of the module docstring (none for a forced ``strategy``); arguments as
    for :func:`layerwise_gram`.

    Returns:
        ``(finish's result, report)``.
    """
    groups = [list(lin.fmodel.params)] if groups is None else groups
    forced_mixing: frozenset[str] = frozenset()
    excluded: frozenset[str] = frozenset()
    attempt, fallback = strategy, None
    reasons: dict[str, str] = {}
    for _ in range(64):
        engine = _Engine(
            lin,
            chunk,
            memory_budget,
            groups,
            attempt,
            forced_mixing,
            tick or _no_tick,
            acc_dtype,
            excluded,
        )
        engine.report.fallback = fallback
        engine.report.reasons.update(reasons)
        try:
            with torch.enable_grad():
                c = engine.forward()
                chosen = engine.plan(c)
                return finish(engine, c, chosen), engine.report
        except LayerTurnedMixing as err:
            forced_mixing = forced_mixing | {str(err)}
            continue
        except MemoryBudgetExceeded:
            if strategy is not None or attempt is not None:
                raise
            attempt = Strategy.STREAMED
            fallback = "columns exceeded memory_budget; streamed instead"
            continue
        except SelfCheckFailed as err:
            # the layers whose rows differ from autograd's: those captured on trust
            # (a Linear subclass's own forward, a recorded call) and, where the
            # factors are per layer (no statistics directions), any layer whose
            # formula does not hold (a table indexed by a tensor whose first
            # dimension happens to be N): leave exactly those generic, run again
            local_factors = chosen in (Strategy.PER_SAMPLE, Strategy.COLUMNS)
            suspects = frozenset(
                la.name
                for la in c.layers
                if (la.on_trust or local_factors)
                and any(id(p) in err.params for p in la.params)
            )
            if suspects:
                excluded = excluded | suspects
                why = "its rows differ from autograd's (self-check)"
                reasons.update(dict.fromkeys(suspects, why))
                continue
            if strategy is None and chosen is Strategy.BN_SPLIT:
                # samples mix beyond BatchNorm statistics: columns assume nothing
                attempt = Strategy.COLUMNS
                fallback = "bn_split failed its self-check; columns instead"
                continue
            raise
    raise RuntimeError("layer-wise engine did not converge on which layers mix samples")


__all__ = [
    "LayerwiseUnavailable",
    "SelfCheckFailed",
    "StrategyUnavailable",
    "layerwise_gram",
    "run_engine",
]
