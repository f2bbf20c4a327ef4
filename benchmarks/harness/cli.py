r"""The command-line options the benchmarks share.

Every driver takes ``--threads`` (torch threads per worker), ``--timeout`` (seconds
per worker), ``--quick`` (the smoke run the tests make) and ``--out`` (the results
folder); those on 3c3d take ``--models`` and ``--merge`` too, those that measure the
floor of the work ``--no-floor``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

#: torch threads per worker unless a benchmark says otherwise.
DEFAULT_THREADS = min(os.cpu_count() or 1, 16)


def parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser, its module docstring as the help text."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_run_options(
    p: argparse.ArgumentParser,
    *,
    quick: str,
    out: Path | None,
    results: Path | None = None,
    threads: int | None = DEFAULT_THREADS,
    timeout: int = 1800,
    threads_help: str = "torch threads per worker",
) -> None:
    """``--threads``, ``--timeout``, ``--quick`` (its help: ``quick``) and ``--out``
    (``None``: the benchmark picks the folder; ``results`` names the committed one)."""
    p.add_argument("--threads", type=int, default=threads, help=threads_help)
    p.add_argument("--timeout", type=int, default=timeout, help="seconds per worker")
    p.add_argument("--quick", action="store_true", help=quick)
    where = f"results folder (default: {results or out})"
    p.add_argument("--out", type=Path, default=out, help=where)


def add_model_options(p: argparse.ArgumentParser, merge: str) -> None:
    """``--models`` (3c3d and/or 3c3d-bn) and ``--merge`` (its help: ``merge``)."""
    models = ["3c3d", "3c3d-bn"]
    p.add_argument("--models", nargs="+", default=models, choices=models)
    p.add_argument("--merge", action="store_true", help=merge)


def add_floor_option(p: argparse.ArgumentParser, rows: str) -> None:
    """``--no-floor``: skip the floor of the work (:mod:`harness.floor`) on ``rows``."""
    what = f"skip the floor of the work (harness.floor) on {rows}"
    p.add_argument("--no-floor", action="store_true", help=what)
