"""The toolkit's modes as ``str`` enums: paths, strategies, solvers, accumulation.

They sit below every stage that names them: the engine reports a :class:`Strategy`
(:mod:`lowrank_ggn.core.engine.report`), the solvers choose a :class:`Solver`
(:mod:`lowrank_ggn.core.solvers`), and neither imports the other for it. Each member
equals its string (``Strategy.STREAMED == "streamed"``), but members of two
different modes never compare equal, even where their strings do:
``PathName.PER_SAMPLE != Strategy.PER_SAMPLE``.
"""

from __future__ import annotations

import enum


class Mode(str, enum.Enum):
    """A ``str`` enum whose members equal their strings, never another mode's."""

    def __eq__(self, other: object) -> bool:
        if isinstance(other, enum.Enum) and type(other) is not type(self):
            return False
        return str.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:  # a dict keyed by the strings finds the members
        return str.__hash__(self)

    def __str__(self) -> str:
        return self.value


class PathName(Mode):
    """The engine's two paths (a ``str``: ``PathName.FULL_BATCH == "full_batch"``)."""

    PER_SAMPLE = "per_sample"
    FULL_BATCH = "full_batch"

    def __repr__(self) -> str:
        return repr(self.value)


class Strategy(Mode):
    """How the columns of ``V`` are backpropagated.

    See :mod:`lowrank_ggn.core.engine.report` for what each strategy costs;
    ``GENERIC`` is ``engine="generic"``: explicit ``Vᵀ`` ``[N·C, D]``.
    """

    PER_SAMPLE = "per_sample"
    BN_SPLIT = "bn_split"
    COLUMNS = "columns"
    STREAMED = "streamed"
    GENERIC = "generic"


class Solver(Mode):
    """How eigenpairs are obtained from the Gram matrix or its operator."""

    DENSE = "dense"
    LANCZOS = "lanczos"
    AUTO = "auto"


class Accumulate(Mode):
    """Where the Gram is summed (:mod:`lowrank_ggn.core.precision`)."""

    FLOAT64 = "float64"
    NATIVE = "native"


__all__ = ["Accumulate", "Mode", "PathName", "Solver", "Strategy"]
