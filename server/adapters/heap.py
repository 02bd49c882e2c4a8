"""Giving free heap memory back to the operating system, so resident memory stays flat under adapter churn.

An adapter's own tensors live in a memory map of their own (`server.adapters.packing`) and leave with it; what
stays behind in the heap is loading's float32 temporaries, spread over loader threads' malloc arenas, which glibc
keeps resident once freed. Cycling 600 rank-8..64 adapters three times through a 1 GiB host tier on the default
model (issue #28; RSS after each cycle, from 1050 MiB before): as loaded, 3026, 3173, 3221 MiB (511-690 MiB free
inside malloc, growing); packed, 2855, 2858, 2874 MiB (a flat 327 MiB free inside malloc); packed and trimmed here,
2574, 2567, 2567 MiB: what the live tensors need. One `malloc_trim(0)` took 10-16 ms, so it runs on a loader
thread (never the engine thread or the event loop), once per `TRIM_EVERY_BYTES` of weights evicted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable

TRIM_EVERY_BYTES = 64 << 20  # a few adapters' worth: memory stays within that of flat, trims cost ~1 % of loads


def malloc_trim() -> Callable[[], None] | None:
    """glibc's `malloc_trim(0)`, or None where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


class HeapTrimmer:
    """Counts bytes freed by evictions; `maybe_trim` hands free heap memory back once enough has been freed."""

    def __init__(self, every_bytes: int = TRIM_EVERY_BYTES, trim: Callable[[], None] | None = None) -> None:
        self.every_bytes = every_bytes
        self.trim = trim
        self.num_trims = 0
        self._freed = 0
        self._lock = threading.Lock()

    def freed(self, num_bytes: int) -> None:
        with self._lock:
            self._freed += num_bytes

    def maybe_trim(self) -> bool:
        """Trim if `every_bytes` were freed since the last trim (call it off the engine thread); whether it did."""
        with self._lock:
            if self.trim is None or self._freed < self.every_bytes:
                return False
            self._freed = 0
            self.num_trims += 1
        self.trim()  # outside the lock: another thread's eviction need not wait for it
        return True
