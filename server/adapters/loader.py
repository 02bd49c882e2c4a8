"""Loading adapter versions into host memory on a worker thread, one load per key at a time."""

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
    from server.metrics import Metrics

log = logging.getLogger(__name__)

Read = Callable[[str], AdapterWeights]  # key -> its checked weights, read from the store
OnLoaded = Callable[[str, AdapterWeights], None]  # hand-over of a finished load, on the worker thread


class AdapterLoader:
    """Reads, validates and prepares adapters off the engine thread; callers share the load of a key in progress."""

    def __init__(self, read: Read, on_loaded: OnLoaded, metrics: Metrics | None) -> None:
        self.read = read
        self.on_loaded = on_loaded
        self.metrics = metrics
        self._loading: dict[str, Future[AdapterWeights]] = {}
        self._lock = threading.Lock()  # last in the lock order: nothing is called while it is held
        self._pool = ThreadPoolExecutor(1, "adapter-loader", initializer=pin_single_thread)  # see server.threads

    def load(self, key: str) -> Future[AdapterWeights]:
        """The load of `key`: the one in progress, or a new one."""
        with self._lock:
            future = self._loading.get(key)
            if future is None:
                future = self._loading[key] = self._pool.submit(self._load, key)
            return future

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _load(self, key: str) -> AdapterWeights:
        start = time.perf_counter()
        try:
            weights = self.read(key)
            seconds = time.perf_counter() - start
            log.info("loaded adapter %s into host memory in %.1f ms", key, 1e3 * seconds)
            if self.metrics is not None:
                self.metrics.record_adapter_load(seconds)
            self.on_loaded(key, weights)
            return weights
        except Exception as exc:
            log.warning("could not load adapter %s: %s", key, exc)
            raise
        finally:
            with self._lock:
                self._loading.pop(key, None)
