r"""The structure audit's result as data: one check per structure, and its text.

:func:`lowrank_ggn.diagnostics.audit.audit_structure` fills a
:class:`StructureReport`; ``str(report)`` renders its checks and what they imply
for each quantity as fixed-width tables.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from lowrank_ggn.core.paths import EnginePath


@dataclass(frozen=True)
class StructureCheck:
    """One structure of the loss: does it hold, how was that checked, what follows.

    Attributes:
        name: The structure, e.g. ``"SIMD forward pass"``.
        holds: Whether it holds for this model, batch and loss.
        how: How it was checked (module types and numerical probes, with numbers).
        consequence: What it implies for the quantities lowrank_ggn computes.

    """

    name: str
    holds: bool
    how: str
    consequence: str


@dataclass(frozen=True)
class StructureReport:
    """Result of :func:`audit_structure`; ``str()`` renders it as tables.

    Attributes:
        checks: The :class:`StructureCheck` of each structure, weakest first.
        quantities: ``(quantity, status)`` rows: which quantities are defined.
        sample_independent: Whether ``F_n(X, θ) = f(x_n, θ)`` (SIMD forward pass).
        mixing_modules: Qualified names of the modules that mix samples (``"1"``
            for ``Sequential`` index 1, ``"1.bn"`` inside a block, ``"<root>"`` for
            the model's own forward).
        deterministic: Whether two forward passes agree (no active dropout).
        random_modules: Qualified names of active dropout modules.
        path: The path the GGN engine takes for this model and batch.
        explanation: What per-component quantities mean for this model.
        located_modules: The modules the input probe alone localised (independent
            of the module scan; empty if nothing mixes or inputs are integers).
        summary: One line on the problem (``N``, outputs per sample, loss, ``ρ``, ``D``).

    """

    checks: tuple[StructureCheck, ...]
    quantities: tuple[tuple[str, str], ...]
    sample_independent: bool
    mixing_modules: tuple[str, ...]
    deterministic: bool
    random_modules: tuple[str, ...]
    path: EnginePath
    explanation: str
    located_modules: tuple[str, ...] = ()
    summary: str = ""

    def check(self, name: str) -> StructureCheck:
        """The check called ``name``."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no structure {name!r}; have {[c.name for c in self.checks]}")

    def __str__(self) -> str:
        rows = [
            (c.name, "yes" if c.holds else "NO", c.consequence) for c in self.checks
        ]
        lines = [self.summary, ""] if self.summary else []
        lines += _table(("structure", "holds?", "consequence"), rows, 62)
        lines += ["", "how checked:"]
        for c in self.checks:
            body = textwrap.wrap(f"{c.name}: {c.how}", 90)
            lines += ["  " + body[0]] + ["    " + b for b in body[1:]]
        lines += ["", *_table(("quantity", "status"), self.quantities, 70)]
        return "\n".join(lines)


def _table(
    header: tuple[str, ...], rows: Sequence[tuple[str, ...]], width: int
) -> list[str]:
    """Fixed-width table; the last column wraps at ``width`` characters."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]

    def fmt(cells: Sequence[str]) -> list[str]:
        wrapped = textwrap.wrap(cells[-1], width) or [""]
        lead = "  ".join(c.ljust(w) for c, w in zip(cells[:-1], widths))
        pad = " " * len(lead)
        return [f"{lead}  {wrapped[0]}"] + [f"{pad}  {w}" for w in wrapped[1:]]

    rule = "  ".join(["-" * w for w in widths] + ["-" * width])
    return fmt(header) + [rule] + [line for r in rows for line in fmt(r)]


__all__ = ["StructureCheck", "StructureReport"]
