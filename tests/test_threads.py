"""Importing lowrank_ggn lets scipy's OpenBLAS threads sleep soon (lowrank_ggn._threads)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = (
    "import sys, os; import lowrank_ggn; "
    "print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"
)


@pytest.mark.parametrize("given, expected", [(None, "4"), ("10", "10")])
def test_openblas_spin_is_short_unless_the_environment_says(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if given is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = given
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == expected


def test_scipy_is_not_loaded_before_the_setting():
    """``_threads`` is the package's first import: scipy's BLAS reads it on loading."""
    probe = (
        "import sys, builtins; real = builtins.__import__\n"
        "def spy(name, *a, **k):\n"
        "    if name.startswith('scipy') and 'lowrank_ggn._threads' not in sys.modules:\n"
        "        raise SystemExit('scipy before _threads')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = spy\n"
        "import lowrank_ggn\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)
