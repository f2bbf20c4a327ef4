"""Hand freed heap memory back to the operating system between large work chunks.

On Linux, glibc raises its mmap threshold after large blocks are freed, so the many
same-sized temporaries of repeated batched backward passes end up on the heap, which
fragments and never shrinks: the process's resident memory then grows with the number
of chunks although the live tensors do not. ``malloc_trim(0)`` returns the free heap
pages; it changes no allocation policy and is a no-op where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Return free heap memory to the OS (glibc ``malloc_trim``); else do nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
