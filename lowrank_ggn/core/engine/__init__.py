"""The Gram engine: capture → plan → backpropagate → self-check → assemble.

========================  ===================================================
module                    what it does
========================  ===================================================
:mod:`.layers`            which modules are captured; their operands from a call
:mod:`.operands`          per-layer rows, Gram forms and their costs
:mod:`.layer`             one captured layer: call, output, operand, rows
:mod:`.calls`             the function mode: BatchNorm, recorded calls, reads
:mod:`.attention`         multi-head attention opened into recorded projections
:mod:`.capture`           hooks + mode: the engine's layers from one forward pass
:mod:`.batchnorm`         BatchNorm recomputed (one fused function), gated statistics
:mod:`.plan`              the cost model that picks a strategy
:mod:`.backprop`          backward-pass strategies (frozen, statistics, columns)
:mod:`.statistics`        statistics directions from below the conv feeding a BN
:mod:`.streamed`          the Gram operator from VJPs and JVPs
:mod:`.injected`          its JVP driven by layer-output tangents, no parameter rows
:mod:`.selfcheck`         ``V w`` from the factors against autograd
:mod:`.accumulate`        pure Gram accumulation (Kronecker, explicit, syrk)
:mod:`.assemble`          the Grams from one strategy's factors, block by block
:mod:`.rows`              ``Vᵀ`` from one strategy's factors (the data-set solver)
:mod:`.diagonal`          the GGN diagonal from the engine's passes and operands
:mod:`.report`            strategies, treatments and pass counts as data
:mod:`.unavailable`       why the engine gives no factors: its exceptions
:mod:`.run`               the orchestration (:func:`layerwise_gram`, ``run_engine``)
========================  ===================================================
"""

from lowrank_ggn.core.engine.report import EngineReport, LayerTreatment
from lowrank_ggn.core.engine.run import (
    LayerwiseUnavailable,
    SelfCheckFailed,
    StrategyUnavailable,
    layerwise_gram,
)
from lowrank_ggn.core.modes import Solver, Strategy

__all__ = [
    "EngineReport",
    "LayerTreatment",
    "LayerwiseUnavailable",
    "SelfCheckFailed",
    "Solver",
    "Strategy",
    "StrategyUnavailable",
    "layerwise_gram",
]
