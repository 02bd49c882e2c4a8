"""Loading adapter versions into host memory on worker threads: in arrival order, deduplicated, bounded.

A request's adapter is queued for loading the moment the request arrives (`AdapterCache.hold`), so loads run in the
order requests came in, while the engine computes the others. Every caller asking for a key being loaded shares
that load. At most `LOAD_WORKERS` loads run at once and together they read at most `max_bytes_in_flight` of
weights (one load larger than that runs alone), so a burst of cold requests over thousands of adapters neither
floods the disk nor holds more than a bounded amount of half-checked weights in memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from server.adapters.weights import AdapterWeights
from server.threads import pin_single_thread

if TYPE_CHECKING:
    from server.adapter_metrics import LoadOutcome, LoadTier
    from server.metrics import Metrics

log = logging.getLogger(__name__)

Read = Callable[[str], AdapterWeights]  # key -> its checked weights, read from the store
Size = Callable[[str], int]  # key -> bytes its weights file holds on disk (0 when unknown)
OnLoaded = Callable[[str, AdapterWeights], None]  # hand-over of a finished load, on the worker thread

# Two: one load's validation (CPU) overlaps the next one's disk read; more would take cores from the engine.
LOAD_WORKERS = 2


class ByteBudget:
    """Bytes of adapter weights being loaded at once; a load waits while the others hold too much of it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._cond = threading.Condition()

    def acquire(self, num_bytes: int) -> None:
        """Wait until `num_bytes` fit next to the loads in flight; a load over the whole budget waits to run alone."""
        with self._cond:
            self._cond.wait_for(lambda: self.in_flight == 0 or self.in_flight + num_bytes <= self.limit)
            self.in_flight += num_bytes

    def release(self, num_bytes: int) -> None:
        with self._cond:
            self.in_flight -= num_bytes
            self._cond.notify_all()


class AdapterLoader:
    """Reads, validates and prepares adapters off the engine thread; callers share the load of a key in progress."""

    def __init__(
        self, read: Read, on_loaded: OnLoaded, metrics: Metrics | None, size: Size | None = None,
        max_bytes_in_flight: int = 2**30, workers: int = LOAD_WORKERS,
    ) -> None:  # fmt: skip
        self.read = read
        self.on_loaded = on_loaded
        self.metrics = metrics
        self.size = size or (lambda key: 0)
        self.budget = ByteBudget(max_bytes_in_flight)
        self._loading: dict[str, Future[AdapterWeights]] = {}
        self._lock = threading.Lock()  # last in the lock order: nothing is called while it is held
        # FIFO: the executor's queue keeps the loads in the order they were asked for (requests' arrival order).
        self._pool = ThreadPoolExecutor(workers, "adapter-loader", initializer=pin_single_thread)  # server.threads

    def load(self, key: str) -> Future[AdapterWeights]:
        """The load of `key`: the one in progress or queued, or a new one queued behind those."""
        with self._lock:
            future = self._loading.get(key)
            joined = future is not None
            if future is None:
                future = self._loading[key] = self._pool.submit(self._load, key)
        if joined:
            self._record("host", "joined")
        return future

    def loading(self, key: str) -> bool:
        with self._lock:
            return key in self._loading

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _load(self, key: str) -> AdapterWeights:
        num_bytes = 0
        try:
            num_bytes = self.size(key)
            self.budget.acquire(num_bytes)
            start = time.perf_counter()
            try:
                weights = self.read(key)
            finally:
                self.budget.release(num_bytes)
            seconds = time.perf_counter() - start
            log.info("loaded adapter %s (%d bytes) into host memory in %.1f ms", key, num_bytes, 1e3 * seconds)
            if self.metrics is not None:
                self.metrics.record_adapter_load(seconds)
            self._record("host", "ok", seconds)
            self.on_loaded(key, weights)
            return weights
        except Exception as exc:
            log.warning("could not load adapter %s: %s", key, exc)
            self._record("host", "error")
            raise
        finally:
            with self._lock:
                self._loading.pop(key, None)

    def _record(self, tier: LoadTier, outcome: LoadOutcome, seconds: float | None = None) -> None:
        if self.metrics is not None:
            self.metrics.adapter_tiers.record_load(tier, outcome, seconds)
