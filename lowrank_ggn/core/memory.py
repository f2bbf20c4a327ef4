r"""The C heap between and during calls: freed memory back to the OS, blocks reused.

**Between chunks.** On Linux, glibc raises its mmap threshold after large blocks are
freed, so the many same-sized temporaries of repeated batched backward passes end up on
the heap, which fragments and never shrinks: the process's resident memory then grows
with the number of chunks although the live tensors do not. ``malloc_trim(0)``
(:func:`release_free_memory`) returns the free heap pages.

**During a call** (:func:`heap_reuse`, entered by every entry point on CPU models). The
engine's backward passes allocate and free the same large activation gradients once per
column or statistics direction. glibc serves every block above its mmap threshold (at
most 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``, so each such temporary
costs a page fault per 4 KiB page, the kernel zeroing it first: on 2 cores a ``[256, 64,
28, 28]`` float32 BatchNorm backward took 21 ms this way, 5 ms at half that size from
reused heap blocks. Inside the context glibc takes no block from ``mmap`` (``M_MMAP_MAX
= 0``) and keeps freed memory on the heap (``M_TRIM_THRESHOLD`` out of reach), so later
temporaries reuse pages already mapped. Measured on 3c3d-BN, N = 256, float32, 2 cores:
83.2 s against 58.8 s, peak resident 2.55 against 2.68 GiB; plain 3c3d, N = 256:
14.6–15.2 s against 13.5–14.4 s. On exit the defaults are set again (``M_MMAP_MAX =
65536``, ``M_TRIM_THRESHOLD = 128 KiB``) and the free heap is returned
(``malloc_trim(0)``). Fragmentation can raise a call's peak a little (the figures above;
``memory_budget``'s measured bounds still hold). Side effect: once any ``mallopt`` ran,
glibc keeps its mmap threshold fixed at its value then instead of adapting it. A process
that tunes its allocator itself (``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or malloc ``GLIBC_TUNABLES`` in its
environment) or sets ``LOWRANK_GGN_HEAP_REUSE=0`` is left alone; without glibc both
functions do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: glibc's ``mallopt`` parameters and their defaults.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
#: ``M_TRIM_THRESHOLD`` inside :func:`heap_reuse`: never trim (``int`` max).
NO_TRIM = 2**31 - 1
#: Environment variables by which a process tunes glibc's allocator itself.
USER_TUNING = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.malloc_trim, lib.mallopt  # noqa: B018 (glibc only)
    except (OSError, AttributeError):
        return None
    return lib


def release_free_memory() -> None:
    """Return free heap memory to the OS (glibc ``malloc_trim``); else do nothing."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


def _user_tunes_allocator() -> bool:
    """Whether the environment tunes glibc's allocator or opts out of :func:`heap_reuse`."""
    if os.environ.get("LOWRANK_GGN_HEAP_REUSE", "1") == "0":
        return True
    if any(name in os.environ for name in USER_TUNING):
        return True
    return "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")


class _Open:
    """How many :func:`heap_reuse` blocks are open (nested or in threads), under a lock."""

    lock = threading.Lock()
    depth = 0


@contextmanager
def heap_reuse(enabled: bool = True) -> Iterator[None]:
    """Large freed blocks stay on the heap for reuse inside the block (see module docstring).

    Nested and concurrent blocks share one setting: the outermost one sets it, the
    last one out restores the defaults. ``enabled=False`` (a model off the CPU), no
    glibc, or an environment that tunes the allocator itself: nothing changes.
    """
    lib = _libc() if enabled and not _user_tunes_allocator() else None
    if lib is None:
        yield
        return
    with _Open.lock:
        _Open.depth += 1
        if _Open.depth == 1:
            lib.mallopt(M_MMAP_MAX, 0)
            lib.mallopt(M_TRIM_THRESHOLD, NO_TRIM)
    try:
        yield
    finally:
        with _Open.lock:
            _Open.depth -= 1
            if _Open.depth == 0:
                lib.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                lib.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                lib.malloc_trim(0)
