r"""Worker subprocesses: one measurement per fresh process, failures as rows.

A benchmark's driver starts its own script again with ``--worker SPEC``; the worker
prints one JSON record as its last line of output. :func:`run_worker` turns whatever
happens (a record, an exception, a signal, a timeout) into a row, so a driver never
stops on one failed case. :func:`previous_release` exports an older ``lowrank_ggn``
with ``git archive`` for workers that run it (``PYTHONPATH`` or ``sys.path``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the repository


def exception_line(stderr: str) -> str:
    """The ``SomeError: message`` line of a traceback (its last line otherwise)."""
    lines = stderr.strip().splitlines() or ["?"]
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", lines[i]):
            return " ".join(x.strip() for x in lines[i : i + 3])[:300]
    return lines[-1]


def run_worker(
    cmd: list[str], timeout: float | None, pythonpath: str | None = None
) -> Any:
    """Run ``cmd``; its last stdout line parsed as JSON (a record), or ``{"error": why}``.

    ``pythonpath`` goes first on the worker's ``PYTHONPATH`` (a previous release
    shadows the installed package). Why a worker failed: ``timed out after T s``,
    ``killed by signal S`` (``(out of memory?)`` for 9) or its exception's line.
    """
    env = None
    if pythonpath:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [pythonpath, *filter(None, [env.get("PYTHONPATH")])]
        )
    try:
        proc = subprocess.run(
            cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode < 0:
        err = f"killed by signal {-proc.returncode}"
        return {"error": err + (" (out of memory?)" if proc.returncode == -9 else "")}
    if proc.returncode > 0:
        return {"error": exception_line(proc.stderr)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def announce(label: str) -> None:
    """Print a case's label, the outcome follows on the same line (stderr)."""
    print(label, end=" ", flush=True, file=sys.stderr)


def outcome(rec: dict) -> dict:
    """Print a record's time and peak RSS, its failure or its skip; return it."""
    if "error" in rec:
        line = f"FAILED: {rec['error']}"
    elif "skipped" in rec:
        line = f"skipped: {rec['skipped']}"
    else:
        line = (
            f"{rec['time_s']:8.2f} s  peak RSS {rec['peak_rss_bytes'] / 2**30:6.2f} GiB"
        )
    print(line, file=sys.stderr)
    return rec


def export_previous(rev: str | None) -> str | None:
    """``lowrank_ggn`` as of git revision ``rev``, unpacked into a temporary folder."""
    if rev is None:
        return None
    target = Path(tempfile.mkdtemp(prefix="lowrank_ggn_previous_"))
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "lowrank_ggn"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return str(target)


@contextlib.contextmanager
def previous_release(rev: str | None) -> Iterator[str | None]:
    """:func:`export_previous` for the ``with`` block, removed afterwards."""
    folder = export_previous(rev)
    try:
        yield folder
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
