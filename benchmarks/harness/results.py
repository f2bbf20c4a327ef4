r"""Results: records as plain data, derived numbers, JSON and markdown files.

Records are dicts; a failed or skipped case carries ``error`` or ``skipped`` instead
of its measurements (:func:`ok`). Each benchmark writes ``<stem>.json`` and
``<stem>.md`` into its results folder (:data:`RESULTS` unless told otherwise) with
:func:`write_results`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from enum import Enum
from pathlib import Path

#: The committed results folder, ``benchmarks/results`` (the drivers' ``--out``).
RESULTS = Path(__file__).resolve().parents[1] / "results"
#: ``met`` of a target as a table cell.
MET = {True: "yes", False: "**no**", None: "not measured"}


def ok(rec: dict | None) -> bool:
    """Whether ``rec`` is a measurement (not missing, failed or skipped)."""
    return rec is not None and "error" not in rec and "skipped" not in rec


def find(records: list[dict], **match) -> dict | None:
    """The first record whose fields equal ``match``, or ``None``."""
    return next(
        (r for r in records if all(r.get(k) == v for k, v in match.items())), None
    )


def rel_dev(a: list[float], ref: list[float]) -> float:
    """``max_i |a_i − ref_i| / |ref_0|`` over the common leading eigenvalues."""
    n = min(len(a), len(ref))
    return max(abs(x - z) for x, z in zip(a[:n], ref[:n])) / abs(ref[0])


def ratio(a: dict | None, b: dict | None, key: str = "time_s") -> float | None:
    """``a[key] / b[key]`` where both are measurements, else ``None``."""
    return a[key] / b[key] if ok(a) and ok(b) else None


def plain_data(obj):
    """JSON-ready copy of an engine report: dataclasses by field, enums by value."""
    if isinstance(obj, Enum):
        return str(obj.value)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: plain_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)
        }
    if isinstance(obj, Mapping):
        return {str(plain_data(k)): plain_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [plain_data(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def gib(b: float | None) -> str:
    """Bytes as GiB with two decimals (empty for ``None``)."""
    return "" if b is None else f"{b / 2**30:.2f}"


def fmt(x, spec: str = ".2f") -> str:
    """A number as ``spec``, a bool as yes/no, ``None`` as an empty cell."""
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "no"
    return format(x, spec)


def failure(rec: dict, width: int = 80) -> str:
    """``failed: …`` or ``skipped: …`` of a record, safe in a table cell."""
    what = (
        f"failed: {rec['error'][:width]}"
        if "error" in rec
        else f"skipped: {rec['skipped']}"
    )
    return what.replace("|", "\\|")


def targets_table(targets: list[dict], part: bool = False) -> list[str]:
    """Markdown rows of targets (``target``, ``value``, ``met``; ``part`` first)."""
    head = (
        "| part | target | measured | met |" if part else "| target | measured | met |"
    )
    lines = [head, "|---|---|---|---|" if part else "|---|---|---|"]
    for t in targets:
        value = t["value"]
        value = fmt(value) if isinstance(value, float) else fmt(value, "")
        cells = [t["target"], value, MET[t["met"]]]
        lines.append("| " + " | ".join(([t["part"]] if part else []) + cells) + " |")
    return lines


def write_results(out: Path, stem: str, result: dict | list, markdown: str) -> Path:
    """``out/<stem>.json`` (the result, indented) and ``out/<stem>.md``; the latter."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    path = out / f"{stem}.md"
    path.write_text(markdown)
    return path
