r"""Peak resident memory and wall time of one call, measured the same way everywhere.

A worker resets the kernel's peak mark before the timed call (:func:`reset_peak_rss`),
notes the resident set (:func:`resident_bytes`) and reads the peak after it
(:func:`peak_rss_bytes`); the call's own peak is the difference. :func:`measure` does
all of that around one call (and, on CUDA, reads the peak allocated device memory).

The peak is ``VmHWM`` from ``/proc/self/status``, not ``getrusage().ru_maxrss``:
Linux folds the parent's peak into a child's ``ru_maxrss`` at ``exec``, so a worker
started from a large process (a pytest worker, a driver that built a model) would
read its parent's peak. Nothing here imports ``lowrank_ggn``: workers may run a
previous release on ``sys.path``.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


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
        _CLEAR_REFS.write_text("5")
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


def measure(
    fn: Callable[[], Any], device: str = "cpu", reset: bool = True
) -> tuple[Any, dict]:
    """``fn()`` timed once; its result and what the call cost.

    The record holds ``time_s`` (``time.perf_counter``, CUDA synchronised),
    ``peak_rss_bytes`` (``VmHWM`` after the call) and ``baseline_rss_bytes``: with
    ``reset``, the resident set at the call's start after :func:`reset_peak_rss`
    (``peak_rss_reset`` says whether the kernel took the reset); without, the peak
    mark before the call (the peak then includes everything before, as in
    ``bench_gram.py``). On CUDA also ``peak_cuda_bytes``, the peak allocated device
    memory of the call.
    """
    import torch

    fields: dict = {}
    base = None
    if reset:
        fields["peak_rss_reset"] = reset_peak_rss()
        base = resident_bytes() if fields["peak_rss_reset"] else None
    if base is None:
        base = peak_rss_bytes()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    record = {
        "time_s": elapsed,
        "peak_rss_bytes": peak_rss_bytes(),
        "baseline_rss_bytes": base,
        **fields,
    }
    if cuda:
        record["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return out, record
