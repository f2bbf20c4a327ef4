r"""The process's resident memory, measured: now, its peak, and the peak of one call.

Linux ``/proc/self/status``: ``VmRSS`` (resident now) and ``VmHWM`` (the kernel's
high-water mark, reset through ``/proc/self/clear_refs``). :class:`PeakMonitor`
reports a call's peak above its start, the kernel's mark where it rose, else a 2 ms
sampler; :attr:`lowrank_ggn.core.engine.EngineReport.memory_peak` holds it next to
the estimate of :mod:`lowrank_ggn.core.footprint`. Everything returns ``None``
elsewhere.
"""

from __future__ import annotations

import gc
import os
import re
import threading

from lowrank_ggn.core.memory import release_free_memory

_STATUS = "/proc/self/status"


def _status_kib(field_name: str) -> int | None:
    try:
        with open(_STATUS) as f:
            match = re.search(rf"{field_name}:\s+(\d+)", f.read())
    except OSError:
        return None
    return None if match is None else int(match.group(1)) * 1024


def resident_bytes() -> int | None:
    """The process's resident set size now (``VmRSS``); ``None`` off Linux."""
    return _status_kib("VmRSS")


def peak_resident_bytes() -> int | None:
    """The process's own peak resident set size (``VmHWM``); ``None`` off Linux.

    The peak since the process started or since the last :func:`reset_peak_resident`.

    Not ``getrusage().ru_maxrss``: Linux folds the parent's peak into a child's
    ``ru_maxrss`` at ``exec``, so a worker launched from a large process (a pytest
    worker, a benchmark driver) reads the parent's peak; ``VmHWM`` is the child's own.
    """
    return _status_kib("VmHWM")


def reset_peak_resident() -> bool:
    """Hand freed heap back to the OS, then reset ``VmHWM`` to the current RSS.

    Writes ``5`` to ``/proc/self/clear_refs`` (Linux ≥ 4.0); ``False`` where that is
    refused.
    """
    gc.collect()
    release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class PeakMonitor:
    """Peak resident memory of the process above its value at ``__enter__``.

    Uses the kernel's high-water mark (``VmHWM``) when the call raised it, else the
    largest of samples taken every ``interval`` seconds by a daemon thread. ``peak``
    is ``None`` where ``/proc/self/status`` does not exist (not Linux).
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak: float | None = None
        self._stop = threading.Event()

    def __enter__(self) -> PeakMonitor:
        self.start = _status_kib("VmRSS")
        self.hwm = _status_kib("VmHWM")
        self._max = self.start or 0
        if self.start is not None and os.environ.get("LOWRANK_GGN_NO_MONITOR") != "1":
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self._thread = None
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = _status_kib("VmRSS")
            if now is not None and now > self._max:
                self._max = now

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.start is None:
            return
        now = _status_kib("VmRSS") or 0
        hwm = _status_kib("VmHWM") or 0
        peak = max(self._max, now)
        if self.hwm is not None and hwm > self.hwm:
            peak = max(peak, hwm)
        self.peak = float(max(0, peak - self.start))


__all__ = [
    "PeakMonitor",
    "peak_resident_bytes",
    "reset_peak_resident",
    "resident_bytes",
]
