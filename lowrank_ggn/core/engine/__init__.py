"""The Gram engine: capture → plan → backpropagate → self-check → assemble.

========================  ===================================================
module                    what it does
========================  ===================================================
:mod:`.layers`            which modules are captured; their operands from a call
:mod:`.operands`          per-layer rows, Gram forms and their costs
:mod:`.layer`             one captured layer: call, output, operand, rows
:mod:`.calls`             the function mode: BatchNorm, recorded calls, reads
:mod:`.capture`           hooks + mode: the engine's layers from one forward pass
:mod:`.batchnorm`         BatchNorm recomputed, statistics as gated graph nodes
:mod:`.plan`              the cost model that picks a strategy
:mod:`.backprop`          backward-pass strategies (frozen, statistics, columns)
:mod:`.streamed`          the Gram operator from batched VJPs and JVPs
:mod:`.selfcheck`         ``V w`` from the factors against autograd
:mod:`.accumulate`        pure Gram accumulation (Kronecker, explicit, syrk)
:mod:`.assemble`          the Grams from one strategy's factors, block by block
:mod:`.report`            strategies, treatments and pass counts as data
:mod:`.run`               the orchestration (:func:`layerwise_gram`)
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
