"""The toolkit's modes as ``str`` enums: engine strategies and eigensolvers.

They sit below every stage that names them: the engine reports a :class:`Strategy`
(:mod:`lowrank_ggn.core.engine.report`), the solvers choose a :class:`Solver`
(:mod:`lowrank_ggn.core.solvers`), and neither imports the other for it.
"""

from __future__ import annotations

import enum


class Strategy(str, enum.Enum):
    """How the columns of ``V`` are backpropagated.

    See :mod:`lowrank_ggn.core.engine.report` for what each strategy costs.
    """

    PER_SAMPLE = "per_sample"
    BN_SPLIT = "bn_split"
    COLUMNS = "columns"
    STREAMED = "streamed"
    GENERIC = "generic"

    def __str__(self) -> str:
        return self.value


class Solver(str, enum.Enum):
    """How eigenpairs are obtained from the Gram matrix or its operator."""

    DENSE = "dense"
    LANCZOS = "lanczos"
    AUTO = "auto"

    def __str__(self) -> str:
        return self.value


__all__ = ["Solver", "Strategy"]
