"""The search of ``run.py``: the largest batch that fits, coarse to fine from a hint.

Pure logic (no process, no model): :func:`largest_within` calls ``measure(N)`` for the
outcome of one probe; :func:`previous_limits` reads the hints from an earlier run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path


def largest_within(
    measure: Callable[[int], dict],
    step: int,
    hint: int,
    budget: int,
    tight: bool = False,
) -> tuple[int, dict[int, dict]]:
    """Largest multiple ``N`` of ``step`` whose ``measure(N)`` fits; and all results.

    Coarse to fine: from ``hint``, extrapolate from the measured peaks (up from a
    fitting ``N`` as if the peak grew like ``N²``, at most doubling; down from one over
    budget as if it grew like ``N``, else halving) until one ``N`` fits and one does
    not, then bisect to ``step``. ``tight``: the hint is a previous limit, so the
    second probe is its neighbour (``hint + step`` when the hint fits, else
    ``hint - step``); two probes settle an unchanged limit. Assumes the outcome is
    monotone in ``N``; ``0`` when not even ``step`` fits.
    """
    seen: dict[int, dict] = {}

    def fits(n: int) -> bool:
        if n not in seen:
            seen[n] = measure(n)
        return seen[n]["outcome"] == "fits"

    def peak(n: int) -> float | None:
        return seen[n].get("peak_bytes") or None

    lo, hi = 0, None
    n = max(step, step * round(hint / step))
    while True:
        if fits(n):
            lo = n
        else:
            hi = n
        if hi is not None and hi - lo <= step:
            return lo, seen
        if tight and len(seen) == 1:  # the previous limit's neighbour
            n = lo + step if hi is None else hi - step
        elif hi is None:  # everything fits so far: up from lo
            p = peak(lo)
            guess = lo * math.sqrt(budget / p) if p else 2 * lo
            n = step * math.ceil(min(max(guess, lo + step), 2 * lo) / step)
        elif lo == 0:  # nothing fits yet: down from hi
            p = peak(hi)
            guess = hi * budget / p if p and p > budget else hi / 2
            n = max(step, step * math.floor(min(guess, hi - step) / step))
        else:  # bisect the bracket
            n = step * ((lo + hi) // (2 * step))
        if n in seen:  # cannot happen for a monotone outcome; stop safely
            return lo, seen


def previous_limits(s: dict, here: Path) -> dict[tuple[str, str, str], int]:
    """``(model, variant, method) -> limit_N`` of the run in ``s["hints_from"]`` (in
    the folder ``here``) where it used the same budget and grid; else none."""
    if not s.get("hints_from"):
        return {}
    try:
        prev = json.loads((here / s["hints_from"]).read_text())
    except (OSError, ValueError):
        return {}
    same = all(prev["settings"].get(k) == s[k] for k in ("budget_bytes", "step"))
    return {
        (r["model"], r["variant"], r["method"]): r["limit_N"]
        for r in prev["rows"]
        if same and r["limit_N"]
    }
