r"""Peak resident memory of a benchmark worker, measured the same way everywhere.

A worker resets the kernel's peak mark before the timed call
(:func:`reset_peak_rss`), notes the resident set (:func:`resident_bytes`) and reads the
peak after it (:func:`peak_rss_bytes`); the call's own peak is the difference.

The peak is ``VmHWM`` from ``/proc/self/status``, not ``getrusage().ru_maxrss``:
Linux folds the parent's peak into a child's ``ru_maxrss`` at ``exec``, so a worker
started from a large process (a pytest worker, a driver that built a model) would
read its parent's peak. These helpers do not import ``lowrank_ggn``: workers may run
a previous release on ``sys.path``.
"""

from __future__ import annotations

import ctypes
import gc
import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_bytes(field_name: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Hand freed heap back to the OS, then reset the peak mark to the current RSS.

    Linux (≥ 4.0) resets ``VmHWM`` on ``5 > /proc/self/clear_refs``; ``False`` where
    that is refused (the peak then includes everything before).
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def resident_bytes() -> int | None:
    """Current resident set size (``VmRSS``), or ``None`` off Linux."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """This process's own peak resident set size (``VmHWM``) since its start or the
    last :func:`reset_peak_rss`; off Linux, ``ru_maxrss`` (which may include the
    parent's peak)."""
    peak = _status_bytes("VmHWM")
    if peak is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak
