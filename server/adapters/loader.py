"""Loading adapter versions from the store into host memory, on a worker thread, one load per key at a time."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from server.adapters.records import AdapterRecord
from server.adapters.store import AdapterStore
from server.adapters.validation import load_from_store
from server.adapters.versions import HostEntry, adapter_name
from server.adapters.weights import AdapterWeights, ModelInfo
from server.threads import pin_single_thread

if TYPE_CHECKING:
    from server.metrics import Metrics

log = logging.getLogger(__name__)

OnLoaded = Callable[[str, AdapterWeights, AdapterRecord], HostEntry]  # (key, weights, record) -> its host entry


class AdapterLoader:
    """Reads, validates and prepares adapters off the engine thread; callers share the load of a key in progress."""

    def __init__(
        self, store: AdapterStore, info: ModelInfo, max_lora_rank: int, on_loaded: OnLoaded, metrics: Metrics | None
    ) -> None:
        self.store = store
        self.info = info
        self.max_lora_rank = max_lora_rank
        self.on_loaded = on_loaded
        self.metrics = metrics
        self._loading: dict[str, Future[HostEntry]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, "adapter-loader", initializer=pin_single_thread)  # see server.threads

    def is_loading(self, key: str) -> bool:
        with self._lock:
            return key in self._loading

    def load(self, key: str) -> Future[HostEntry]:
        """The load of `key`: the one in progress, or a new one."""
        with self._lock:
            future = self._loading.get(key)
            if future is None:
                future = self._loading[key] = self._pool.submit(self._load, key)
            return future

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _load(self, key: str) -> HostEntry:
        start = time.perf_counter()
        try:
            weights, record = load_from_store(self.store, adapter_name(key), self.info, self.max_lora_rank)
            seconds = time.perf_counter() - start
            log.info("loaded adapter %s into host memory in %.1f ms", key, 1e3 * seconds)
            if self.metrics is not None:
                self.metrics.record_adapter_load(seconds)
            return self.on_loaded(key, weights, record)
        except Exception as exc:
            log.warning("could not load adapter %s: %s", key, exc)
            raise
        finally:
            with self._lock:
                self._loading.pop(key, None)
