"""Adapter versions for serving: every adapter of the store, and where each version is (disk, host, device slot).

Requests hold an adapter *key*, `name@version`, never a bare name. Adding or replacing an adapter gives its files a
new version, so sequences already running keep the old version's host entry and device slot while new requests get
the new one; a version that is no longer current is dropped when its last user finishes. Loading from disk (read,
validate, compute DoRA factors) runs on a worker thread when a request for a cold adapter arrives, so the engine
keeps stepping; the engine thread only copies host updates into a device slot. Host entries are held while requests
use them, device slots while running sequences do, pinned adapters stay on the device; idle entries are evicted least
recently used first. `server.adapters.registry` adds the operations that change the store.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Set
from typing import TYPE_CHECKING

from torch import nn

from server.adapters.device_slots import DeviceSlots
from server.adapters.host_cache import HostCache
from server.adapters.loader import AdapterLoader
from server.adapters.records import AdapterRecord
from server.adapters.slots import load_adapter_slot
from server.adapters.store import AdapterMeta, AdapterStore, Mode
from server.adapters.versions import AdapterState, HostEntry, adapter_key, adapter_name
from server.adapters.weights import AdapterWeights, ModelInfo
from server.errors import NotFoundError

if TYPE_CHECKING:
    from server.metrics import CacheEvent, CacheTier, Metrics

log = logging.getLogger(__name__)


class AdapterCache:
    """Where every adapter version is (disk, host, device slot), and the request-side operations that move it."""

    def __init__(
        self,
        store: AdapterStore,
        model: nn.Module,
        info: ModelInfo,
        max_loras: int,
        max_cpu_loras: int,
        max_lora_rank: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.model = model
        self.info = info
        self.max_lora_rank = max_lora_rank
        self.max_pinned = max_loras - 1  # one slot always serves the unpinned adapters
        self.metrics = metrics
        self.slots = DeviceSlots(max_loras)
        self._lock = threading.Lock()  # guards the maps below; held briefly
        self._admin = threading.Lock()  # one store change at a time (the registry's admin operations)
        self._states: dict[str, AdapterState] = {}
        self._host = HostCache(max(max_cpu_loras, max_loras))
        self._requests: Counter[str] = Counter()  # per key: acquired, loading included, and not released
        self._versions = itertools.count(1)
        self._loader = AdapterLoader(store, info, max_lora_rank, self._loaded, metrics)
        with self._lock:
            self._sync()

    # --- lookups ----------------------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return self.store.exists(name)

    def listing(self) -> list[tuple[str, int]]:
        """(name, created_at) of every adapter in the store, sorted by name."""
        with self._lock:
            return [(name, self._states[name].meta.created_at) for name in self._sync()]

    def mode(self, adapter: str) -> Mode:
        """The merge mode of an adapter, by name or key; 'unmerged' for one the registry no longer serves."""
        with self._lock:
            state = self._states.get(adapter_name(adapter))
            return "unmerged" if state is None else state.meta.mode

    # --- requests (event loop) --------------------------------------------------------------------------------
    async def acquire(self, name: str) -> str:
        """Hold the current version of `name` in host memory for one request, loading it off-thread if cold.

        Returns the key the request runs with; hand it back to `release` when the request ends.
        """
        with self._lock:
            state = self._state(name)
            key = adapter_key(name, state.version)
            state.last_used = time.time()
            self._requests[key] += 1
            if self._host.hold(key):
                self._record("hit", "host")
                return key
            future = self._loader.load(key)
            self._record("miss", "host")
        try:  # shielded: one caller giving up must not cancel a load others wait for
            entry = await asyncio.shield(asyncio.wrap_future(future))
        except BaseException:
            with self._lock:
                self._forget(key)
            raise
        with self._lock:
            self._host.hold_loaded(key, entry)
            self._evict_host()
        return key

    def release(self, key: str) -> None:
        """End one request's hold on `key`; idle entries beyond the host capacity, or outdated, are evicted."""
        with self._lock:
            self._host.unhold(key)
            self._forget(key)
            state = self._states.get(adapter_name(key))
            if state is not None:
                state.served += 1
                state.last_used = time.time()
            self._evict_host()

    # --- device slots (engine thread) -------------------------------------------------------------------------
    def fits(self, key: str, in_use: Set[str]) -> bool:
        """Whether a sequence of `key` can run next to the adapters `in_use` (the scheduler's admission check)."""
        return self.slots.fits(key, in_use)

    def bind_slot(self, key: str) -> int | None:
        """Device slot of `key` for a sequence about to run, copying the adapter in if it is not resident.

        None when no request holds `key` any more (the host entry of a held key is never evicted): the sequence's
        request was cancelled and the engine drops it at its next step.
        """
        with self._lock:
            weights = self._host.weights(key) if key in self._host else None
        if weights is None:
            return None
        binding = self.slots.bind(key)
        if binding.evicted is not None:
            self._record("eviction", "device")
        if not binding.load:
            self._record("hit", "device")
            return binding.slot
        try:
            load_adapter_slot(self.model, binding.slot, weights.updates)
        except BaseException:
            self.slots.unbind(key)
            self.slots.free(key)
            raise
        self._record("load", "device")
        self._set_resident()
        return binding.slot

    def unbind_slot(self, key: str) -> None:
        if self.slots.unbind(key) == 0:
            with self._lock:
                if not self._is_current(key):
                    self._retire(key)

    def host_weights(self, key: str) -> AdapterWeights | None:
        """The weights of `key` if it is in host memory (every adapter with a submitted request is), else None."""
        with self._lock:
            return self._host.weights(key) if key in self._host else None

    def shutdown(self) -> None:
        self._loader.shutdown()

    # --- internals: call with self._lock held ---------------------------------------------------------------
    def _state(self, name: str) -> AdapterState:
        """The state of `name`, registering a folder dropped in by hand; NotFoundError when it is not on disk."""
        if not self.store.exists(name):
            self._drop(name)
            raise NotFoundError(f"adapter {name!r} is not in the store", param="name")
        return self._states.get(name) or self._register(name)

    def _sync(self) -> list[str]:
        """Match the states to the folders on disk (adapters dropped in or removed by hand); the names."""
        names = self.store.names()
        for name in set(self._states) - set(names):
            self._drop(name)
        for name in names:
            if name not in self._states:
                self._register(name)
        return names

    def _register(self, name: str) -> AdapterState:
        meta = self.store.read_meta(name)
        if meta.pinned and sum(s.meta.pinned for s in self._states.values()) >= self.max_pinned:
            log.warning("not pinning adapter %s: at most %d adapters can be pinned", name, self.max_pinned)
            meta = AdapterMeta(meta.mode, False, meta.created_at)
        state = self._states[name] = AdapterState(next(self._versions), meta)
        self.slots.pin(adapter_key(name, state.version), meta.pinned)
        return state

    def _drop(self, name: str) -> None:
        state = self._states.pop(name, None)
        if state is not None:
            self._retire(adapter_key(name, state.version))

    def _retire(self, key: str) -> None:
        """An outdated version: free its slot and host entry now if idle, else when its last user is done."""
        self.slots.free(key)
        self._evict_host()

    def _is_current(self, key: str) -> bool:
        state = self._states.get(adapter_name(key))
        return state is not None and adapter_key(adapter_name(key), state.version) == key

    def _evict_host(self) -> None:
        """Drop idle host entries: outdated versions at once, current ones least recently used first over capacity."""
        evicted = self._host.evict(keep=self._keeps_host, outdated=lambda key: not self._is_current(key))
        for _ in range(evicted):
            self._record("eviction", "host")
        self._set_resident()

    def _keeps_host(self, key: str) -> bool:
        """In a device slot, or pinned: pinned adapters are never evicted."""
        return self.slots.holds(key) or (self._is_current(key) and self._states[adapter_name(key)].meta.pinned)

    def _forget(self, key: str) -> None:
        self._requests[key] -= 1
        if self._requests[key] <= 0:
            del self._requests[key]

    def _loaded(self, key: str, weights: AdapterWeights, record: AdapterRecord) -> HostEntry:
        """The loader's hand-over (worker thread): cache what it loaded."""
        with self._lock:
            entry = self._host.put(key, weights)
            self._record("load", "host")
            if self._is_current(key):
                self._states[adapter_name(key)].record = record
            return entry

    def _record(self, event: CacheEvent, tier: CacheTier) -> None:
        if self.metrics is not None:
            self.metrics.record_adapter_event(event, tier)

    def _set_resident(self) -> None:
        if self.metrics is not None:
            self.metrics.set_adapters_resident("host", len(self._host))
            self.metrics.set_adapters_resident("device", len(self.slots.resident()))
