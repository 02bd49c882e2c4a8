"""The adapter registry: disk → host-memory LRU → device slots, with reference counts held by requests.

Loading from disk (read, validate, compute DoRA factors) runs in a worker thread when a request for a cold adapter
arrives, so the engine keeps stepping. The engine thread only copies host updates into a device slot, once per
admission of an adapter that is not resident. Host entries are pinned while requests for them are in flight; device
slots while running sequences use them. Idle entries are evicted least recently used first.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from torch import nn

from server.adapters.slots import load_adapter_slot
from server.adapters.store import AdapterStore
from server.adapters.weights import AdapterWeights, ModelInfo, validate_adapter_dir
from server.errors import NotFoundError

log = logging.getLogger(__name__)


@dataclass
class HostEntry:
    """An adapter loaded into host memory."""

    weights: AdapterWeights
    in_flight: int = 0  # requests submitted and not finished
    loaded_at: float = field(default_factory=time.time)


class AdapterRegistry:
    """Where every adapter is (disk, host, device slot) and the operations that move it."""

    def __init__(
        self,
        store: AdapterStore,
        model: nn.Module,
        info: ModelInfo,
        max_loras: int,
        max_cpu_loras: int,
        max_lora_rank: int,
    ) -> None:
        self.store = store
        self.model = model
        self.info = info
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max(max_cpu_loras, max_loras)
        self._lock = threading.Lock()
        self._host: OrderedDict[str, HostEntry] = OrderedDict()  # LRU order, oldest first
        self._loading: dict[str, Future[HostEntry]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-loader")
        self.slots = DeviceSlots(max_loras)

    # --- event-loop side -------------------------------------------------------------------------------------
    async def acquire(self, name: str) -> None:
        """Make `name` resident in host memory (loading it off-thread if cold) and pin it for one request."""
        with self._lock:
            entry = self._host.get(name)
            if entry is not None:
                entry.in_flight += 1
                self._host.move_to_end(name)
                return
            future = self._loading.get(name)
            if future is None:
                future = self._pool.submit(self._load, name)
                self._loading[name] = future
        entry = await asyncio.wrap_future(future)
        with self._lock:
            entry.in_flight += 1
            self._host.move_to_end(name)

    def release(self, name: str) -> None:
        """Unpin one request's hold on `name`; idle entries beyond the host capacity are evicted."""
        with self._lock:
            entry = self._host.get(name)
            if entry is not None:
                entry.in_flight -= 1
            self._evict_host()

    def _load(self, name: str) -> HostEntry:
        try:
            if not self.store.exists(name):
                raise NotFoundError(f"adapter {name!r} is not in the store", param="model")
            start = time.perf_counter()
            weights = validate_adapter_dir(self.store.path(name), self.info, self.max_lora_rank)
            log.info("loaded adapter %s into host memory in %.1f ms", name, 1e3 * (time.perf_counter() - start))
            with self._lock:
                entry = HostEntry(weights)
                self._host[name] = entry
                return entry
        finally:
            with self._lock:
                self._loading.pop(name, None)

    def _evict_host(self) -> None:
        idle = [n for n, e in self._host.items() if e.in_flight <= 0 and not self.slots.holds(n)]
        while len(self._host) > self.max_cpu_loras and idle:
            del self._host[idle.pop(0)]

    # --- engine-thread side ----------------------------------------------------------------------------------
    def bind_slot(self, name: str) -> int:
        """Device slot of `name` for a sequence about to run, copying it in if it is not resident."""
        slot, load = self.slots.bind(name)
        if load:
            with self._lock:
                weights = self._host[name].weights
            load_adapter_slot(self.model, slot, weights.updates)
        return slot

    def unbind_slot(self, name: str) -> None:
        self.slots.unbind(name)

    def host_names(self) -> list[str]:
        with self._lock:
            return list(self._host)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class DeviceSlots:
    """Which adapter each of `max_loras` device slots holds, how many running sequences use it, LRU among idle."""

    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # LRU order, oldest first
        self._users: dict[str, int] = {}
        self._free = list(range(max_loras - 1, -1, -1))
        self._lock = threading.Lock()

    def holds(self, name: str) -> bool:
        with self._lock:
            return name in self._slot_of

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._slot_of)

    def bind(self, name: str) -> tuple[int, bool]:
        """(slot, whether the caller must load the adapter into it); evicts the least recently used idle slot."""
        with self._lock:
            self._users[name] = self._users.get(name, 0) + 1
            if name in self._slot_of:
                self._slot_of.move_to_end(name)
                return self._slot_of[name], False
            if not self._free:
                victim = next((n for n in self._slot_of if self._users.get(n, 0) == 0), None)
                if victim is None:
                    self._users[name] -= 1
                    raise RuntimeError(f"all {self.max_loras} adapter slots are in use; the scheduler must cap them")
                self._free.append(self._slot_of.pop(victim))
                self._users.pop(victim, None)
            self._slot_of[name] = slot = self._free.pop()
            return slot, True

    def unbind(self, name: str) -> None:
        with self._lock:
            if self._users.get(name, 0) > 0:
                self._users[name] -= 1
