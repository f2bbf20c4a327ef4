r"""The cost model: which strategy a Gram computation takes, before its backward passes.

Costs are counted in *full-batch pass equivalents* (one backward pass through the
whole network for one cotangent of the whole batch, cost ``∝ N``), memories in bytes:

============  =====================================  ==================================
strategy      backward work                          memory held (besides the Gram)
============  =====================================  ==================================
per_sample    ``C``                                  ``NC·Σ_l P_l·O_l``
bn_split      ``C + Σ_l 2K_l·f_l``                   ``NC·Σ_l P_l·O_l + 2K·D_up``
columns       ``N·C``                                ``NC·Σ_l P_l·O_l + NC·D_up``
streamed      ``2·N·C`` (VJP + JVP)                  ``B·D`` for a block of ``B``
============  =====================================  ==================================

``K_l`` is the channel count of BatchNorm layer ``l`` with batch statistics, ``f_l``
the fraction of the captured activations computed before it (a statistics direction
is backpropagated only below its layer), ``D_up`` the parameters that run before the
last such layer, ``P_l·O_l`` a captured layer's output size per sample. The Gram's own
accumulation is the same for the first three; each local layer picks its cheapest
exact form from its operand's counts (:mod:`~lowrank_ggn.core.engine.operands`:
Kronecker ``N²·P²·I + N²·C·P·O·(P + C)`` per group, index matches ``N²·P²·L²`` for
embeddings, or explicit rows ``NC·P·D_l + (NC)²·D_l/2``; elementwise affines are
always explicit). The cheapest strategy that fits ``memory_budget`` wins;
``streamed`` always fits.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from lowrank_ggn.core.budget import MemoryBudgetExceeded, MemoryBudgetWarning, fmt_bytes
from lowrank_ggn.core.engine.batchnorm import BNLayer
from lowrank_ggn.core.engine.layer import Layer
from lowrank_ggn.core.modes import Strategy

#: A strategy's blocks may take this share of the budget; chunk buffers get the rest.
FIT = 0.75


@dataclass
class Plan:
    """The chosen strategy with the estimates behind it."""

    strategy: Strategy
    estimates: dict[Strategy, float]
    reason: str
    memory: dict[Strategy, float] = field(default_factory=dict)

    def check_memory(self, strategy: Strategy, budget: int) -> None:
        """Raise ``MemoryError`` if a (forced) strategy would exceed ``budget``."""
        need = self.memory.get(strategy, 0.0)
        if need > budget:
            fits = [s.value for s, m in self.memory.items() if m <= budget]
            raise MemoryBudgetExceeded(
                f"strategy={strategy.value!r} needs about {need / 2**30:.2f} GiB for its "
                f"factors, more than memory_budget={budget / 2**30:.2f} GiB; use "
                f"strategy=None (the cost model picks one that fits: {fits}), or raise "
                "memory_budget."
            )


def split_shape(
    layers: list[Layer], bns: list[BNLayer], order: dict[int, int]
) -> tuple[list[int], int]:
    """Per batch-statistics BatchNorm: activations computed below it; and ``D_up``.

    ``order`` maps ``id(module)`` to its call position in the forward pass.
    """
    stats = [bn for bn in bns if bn.batch_stats]
    last = max((order.get(id(bn.module), -1) for bn in stats), default=-1)
    below = []
    for bn in stats:
        pos = order.get(id(bn.module), -1)
        below.append(
            sum(la.outputs[0].numel() for la in layers if order[id(la.module)] < pos)
            + sum(b.output.numel() for b in bns if order[id(b.module)] < pos)
        )
    d_up = sum(
        p.numel() for la in layers for p in la.params if order[id(la.module)] < last
    )
    d_up += sum(p.numel() for b in bns for p in b.params if order[id(b.module)] < last)
    return below, d_up


def plan_strategy(
    *,
    per_sample: bool,
    NC: int,
    C: int,
    layers: list[Layer],
    bns: list[BNLayer],
    order: dict[int, int],
    generic_numel: int,
    item: int,
    budget: int,
) -> Plan:
    """Choose a strategy by the cost model in the module docstring."""
    # per column, the layer-output gradients that local layers keep, plus one
    # layer's rearranged copy while its block is assembled
    sizes = [la.outputs[0][0].numel() for la in layers]
    local = NC * (sum(sizes) + max(sizes, default=0)) * item
    if per_sample:
        # plus the per-sample rows of parameters in no captured layer
        need = local + NC * generic_numel * item
        if need <= FIT * budget:
            return Plan(
                Strategy.PER_SAMPLE,
                {Strategy.PER_SAMPLE: float(C)},
                "sample-independent model: C backward passes",
                {Strategy.PER_SAMPLE: need, Strategy.STREAMED: 0.0},
            )
        plan = Plan(
            Strategy.STREAMED,
            {Strategy.PER_SAMPLE: float(C), Strategy.STREAMED: 2.0 * NC},
            "only streamed VJP/JVP blocks fit the memory budget",
            {Strategy.PER_SAMPLE: need, Strategy.STREAMED: 0.0},
        )
        _warn_slower(plan, budget)
        return plan
    total_acts = sum(la.outputs[0].numel() for la in layers) + sum(
        b.output.numel() for b in bns
    )
    below, d_up = split_shape(layers, bns, order)
    estimates: dict[Strategy, float] = {}
    memory: dict[Strategy, float] = {}
    if not generic_numel and bns:
        stat_bns = [b for b in bns if b.batch_stats]
        frac = sum(
            b.num_statistics * a / max(1, total_acts) for b, a in zip(stat_bns, below)
        )
        estimates[Strategy.BN_SPLIT] = C + frac
        memory[Strategy.BN_SPLIT] = (
            local + sum(b.num_statistics for b in bns) * d_up * item
        )
    estimates[Strategy.COLUMNS] = float(NC)
    memory[Strategy.COLUMNS] = local + NC * (d_up + generic_numel) * item
    estimates[Strategy.STREAMED] = 2.0 * NC
    memory[Strategy.STREAMED] = 0.0
    fits = [s for s in estimates if memory[s] <= FIT * budget]
    best = min(fits, key=lambda s: estimates[s])
    why = {
        Strategy.BN_SPLIT: "BatchNorm mixes samples only through its statistics: "
        "frozen per-sample passes plus one pass per statistic",
        Strategy.COLUMNS: "one full-batch pass per column is the cheapest",
        Strategy.STREAMED: "only streamed VJP/JVP blocks fit the memory budget",
    }[best]
    if best is Strategy.STREAMED and len(fits) > 1:
        why = "streamed VJP/JVP blocks are the cheapest"
    plan = Plan(best, estimates, why, memory)
    _warn_slower(plan, budget)
    return plan


#: The budget's choice may be this much slower than the best strategy before a warning.
SLOWER = 4.0


def _warn_slower(plan: Plan, budget: int) -> None:
    """Warn when the budget forced a strategy ``SLOWER`` times the unconstrained best."""
    best = min(plan.estimates, key=plan.estimates.__getitem__)
    chosen = plan.estimates[plan.strategy]
    if chosen <= SLOWER * plan.estimates[best]:
        return
    warnings.warn(
        MemoryBudgetWarning(
            f"the memory budget forces strategy={plan.strategy.value!r} (about "
            f"{chosen:.0f} full-batch passes) instead of {best.value!r} (about "
            f"{plan.estimates[best]:.0f} passes, which would hold "
            f"{fmt_bytes(plan.memory.get(best, 0.0))} for its blocks; "
            f"{fmt_bytes(FIT * budget)} are left for them). Raise memory_budget, or "
            "reduce the batch (subsampling), the factor columns (mc_samples) or "
            "the parameters (params) to keep the faster one."
        ),
        stacklevel=2,
    )


__all__ = ["Plan", "plan_strategy", "split_shape"]
