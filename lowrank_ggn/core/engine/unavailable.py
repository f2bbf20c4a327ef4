r"""Why the layer-wise engine gives no Gram or no per-layer factors: its exceptions.

:func:`~lowrank_ggn.core.engine.run.run_engine` raises them; the callers fall back to
a route that assumes nothing (the generic Gram, the streamed diagonal, the rows of
:meth:`~lowrank_ggn.core.linearization.Linearization.factors_matrix`).
"""

from __future__ import annotations

from lowrank_ggn.core.engine.report import EngineReport


class StrategyUnavailable(ValueError):
    """A forced strategy does not apply to this model."""


class LayerwiseUnavailable(Exception):
    """The engine gives no per-layer factors here; ``.report`` says why (``.fallback``).

    The caller falls back to a route that assumes nothing (the generic Gram, the
    streamed diagonal).
    """

    def __init__(self, report: EngineReport) -> None:
        super().__init__(report.fallback or report.reason)
        self.report = report


class SelfCheckFailed(LayerwiseUnavailable):
    """The factors' ``V w`` differs from autograd's; ``.params``: the parameters' ``id``."""

    def __init__(self, report: EngineReport, params: set[int]) -> None:
        super().__init__(report)
        self.params = params


__all__ = ["LayerwiseUnavailable", "SelfCheckFailed", "StrategyUnavailable"]
