"""The two tiers of adapter versions, by key (`name@version`): host memory and device slots, and the loads between.

Requests hold a key in host memory (`hold`/`release`, event loop); a cold key is read from the store on a worker
thread so the engine keeps stepping. Running sequences bind it to a device slot (`bind_slot`/`unbind_slot`, engine
thread), which copies the host weights in. Both tiers are a `RefLRU`: entries in use or pinned stay, idle ones go
least recently used first, a host entry also stays while its key holds a device slot. A retired key (a version that
was replaced or deleted) leaves each tier as soon as it is idle there.

One lock guards both tiers. It is held only for bookkeeping: never across file I/O or a copy into a slot, so a
request never waits behind either. It comes after the registry's locks and before the loader's (see
`server.adapters.registry`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Set
from concurrent.futures import Future
from typing import TYPE_CHECKING, Protocol

from torch import nn

from server.adapters.device_slots import DeviceSlots
from server.adapters.heap import HeapTrimmer, malloc_trim
from server.adapters.loader import AdapterLoader, Read, Size
from server.adapters.lru import RefLRU
from server.adapters.slots import load_adapter_slot
from server.adapters.versions import Tier, adapter_name
from server.adapters.weights import AdapterWeights

if TYPE_CHECKING:
    from server.adapter_metrics import LoadOutcome
    from server.metrics import CacheEvent, CacheTier, Metrics


class AdapterSlots(Protocol):
    """What the engine needs of the adapters: admission, and a device slot per running sequence."""

    def fits(self, key: str, in_use: Set[str]) -> bool: ...
    def bind_slot(self, key: str) -> int | None: ...
    def prefetch_slot(self, key: str) -> bool: ...
    def free_slots(self) -> int: ...
    def unbind_slot(self, key: str) -> None: ...


class AdapterCache:
    """Host memory and device slots for adapter versions, by key; implements `AdapterSlots` for the engine."""

    def __init__(
        self, model: nn.Module, read: Read, max_loras: int, max_cpu_loras: int, max_cpu_lora_bytes: int,
        metrics: Metrics | None = None, size: Size | None = None, max_load_bytes: int = 2**30,
        trimmer: HeapTrimmer | None = None,
    ) -> None:  # fmt: skip
        self.model = model
        self.metrics = metrics
        self.trimmer = trimmer or HeapTrimmer(trim=malloc_trim())  # evicted weights' memory back to the OS
        self._lock = threading.Lock()
        self._host: RefLRU[str, AdapterWeights] = RefLRU(
            max(max_cpu_loras, max_loras), max_cpu_lora_bytes, lambda weights: weights.num_bytes
        )  # references: requests holding the key
        self._slots = DeviceSlots(max_loras)
        self._retired: set[str] = set()
        self._requests: Counter[str] = Counter()  # per key: held, loading included, and not released
        self._prefetched: set[str] = set()  # warmed ahead of any request, not held since; only keys in host memory
        self._loader = AdapterLoader(read, self._loaded, metrics, size, max_load_bytes)

    # --- requests (event loop) --------------------------------------------------------------------------------
    async def hold(self, key: str) -> None:
        """Hold `key` in host memory for one request, loading it off-thread if cold; `release` it when done.

        Raises what reading the adapter raises (nothing is held then).
        """
        with self._lock:
            self._requests[key] += 1
            if self._host.hold(key) is not None:
                self._record("hit", "host")
                if key in self._prefetched:
                    self._prefetched.discard(key)
                    if self.metrics is not None:
                        self.metrics.adapter_tiers.record_prefetch_hit()
                return
            self._prefetched.discard(key)
            future = self._loader.load(key)
            self._record("miss", "host")
        try:  # shielded: one caller giving up must not cancel a load others wait for
            weights = await asyncio.shield(asyncio.wrap_future(future))
        except BaseException:
            with self._lock:
                self._forget(key)
            raise
        with self._lock:
            self._host.put(key, weights, refs=1)  # put back if it was evicted before its requests took it
            self._evict()

    def release(self, key: str) -> None:
        """End one request's hold on `key`."""
        with self._lock:
            self._host.release(key)
            self._forget(key)
            self._evict()

    # --- device slots (engine thread) -------------------------------------------------------------------------
    def fits(self, key: str, in_use: Set[str]) -> bool:
        """Whether a sequence of `key` can run next to the adapters `in_use` (the scheduler's admission check)."""
        with self._lock:
            return self._slots.fits(key, in_use)

    def bind_slot(self, key: str) -> int | None:
        """Device slot of `key` for a sequence about to run, copying the adapter in if it is not resident.

        None when no request holds `key` any more (the host entry of a held key is never evicted): the sequence's
        request was cancelled and the engine drops it at its next step.
        """
        with self._lock:
            weights = self._host.get(key)
            if weights is None:
                return None
            binding = self._slots.bind(key)
        if binding.evicted is not None:
            self._record("eviction", "device")
        if not binding.load:
            self._record("hit", "device")
            return binding.slot
        self._fill_slot(key, binding.slot, weights, bound=True)
        return binding.slot

    def prefetch_slot(self, key: str) -> bool:
        """Copy `key` into a free device slot ahead of its first sequence (engine thread, between steps), if it is in
        host memory; False when there is nothing to do. Evicts nothing; a failed copy frees the slot and raises."""
        with self._lock:
            weights = self._host.get(key)
            slot = None if weights is None or key in self._retired else self._slots.reserve(key)
        if slot is None:
            return False
        self._fill_slot(key, slot, weights, bound=False)
        return True

    def _fill_slot(self, key: str, slot: int, weights: AdapterWeights, bound: bool) -> None:
        """Copy `weights` into `slot`, counted as a device load; a failed copy gives the slot back (and unbinds the key
        where `bound`) and raises. Outside the lock: only the engine thread fills slots, and a reserved or bound key's
        slot is never given away."""
        start = time.perf_counter()
        try:
            load_adapter_slot(self.model, slot, weights.updates)
        except BaseException:
            with self._lock:
                if bound:
                    self._slots.unbind(key)
                self._slots.free(key)
            self._record_load("error")
            raise
        self._record("load", "device")
        self._record_load("ok", time.perf_counter() - start)
        with self._lock:
            self._set_resident()

    def free_slots(self) -> int:
        """Device slots no adapter holds."""
        with self._lock:
            return self._slots.num_free

    def unbind_slot(self, key: str) -> None:
        with self._lock:
            if self._slots.unbind(key) == 0 and key in self._retired:
                self._slots.free(key)
                self._evict()

    def host_weights(self, key: str) -> AdapterWeights | None:
        """The weights of `key` if it is in host memory (every adapter with a submitted request is), else None."""
        with self._lock:
            return self._host.get(key)

    # --- versions (registry) ----------------------------------------------------------------------------------
    def put(self, key: str, weights: AdapterWeights) -> None:
        """Cache a version loaded elsewhere (an upload's checked weights), so its first request is warm."""
        with self._lock:
            self._host.put(key, weights)
            self._record("load", "host")
            self._evict()

    def pin(self, key: str, pinned: bool) -> None:
        """Keep `key` in host memory and, once loaded there, in its device slot."""
        with self._lock:
            self._host.pin(key, pinned)
            self._slots.pin(key, pinned)
            self._evict()

    def warm(self, key: str) -> Future[AdapterWeights] | None:
        """Start loading `key` into host memory ahead of its first request; its load, None if it is there."""
        with self._lock:
            if key in self._host:
                return None
            if not self._requests[key]:  # no request waits for it: a prefetch, counted when one finds it
                self._prefetched.add(key)
            return self._loader.load(key)

    def retire(self, key: str) -> None:
        """A version no longer served to new requests: it leaves each tier once its last user there is done."""
        with self._lock:
            self._retired.add(key)
            self._host.pin(key, False)
            self._slots.free(key)
            self._evict()

    def usage(self, name: str, key: str) -> tuple[Tier, int, int]:
        """Where `key` is, and the running and held requests of every version of `name`."""
        with self._lock:
            tier: Tier = "device" if self._slots.holds(key) else "host" if key in self._host else "disk"
            keys = [k for k in self._requests if adapter_name(k) == name]
            return tier, sum(self._slots.users(k) for k in keys), sum(self._requests[k] for k in keys)

    def slot_users(self) -> int:
        """Running sequences holding a device slot, over all keys (0 when the engine is idle)."""
        with self._lock:
            return sum(self._slots.users(key) for key in self._slots.resident())

    def resident(self) -> list[str]:
        """Keys in device slots, least recently used first."""
        with self._lock:
            return self._slots.resident()

    def shutdown(self) -> None:
        self._loader.shutdown()

    # --- internals: call with self._lock held -----------------------------------------------------------------
    def _evict(self) -> None:
        """Drop idle host entries: retired ones at once, the rest least recently used first while over budget."""
        in_slot = self._slots.holds
        before = self._host.num_bytes
        gone = [k for k in self._retired if self._host.is_idle(k) and not in_slot(k)]
        for key in gone:
            self._host.remove(key)
        for _ in gone + self._host.shrink(keep=in_slot):
            self._record("eviction", "host")
        self.trimmer.freed(before - self._host.num_bytes)
        self._retired = {k for k in self._retired if k in self._host or in_slot(k)}
        self._prefetched = {k for k in self._prefetched if k in self._host or self._loader.loading(k)}
        self._set_resident()

    def _forget(self, key: str) -> None:
        self._requests[key] -= 1
        if self._requests[key] <= 0:
            del self._requests[key]

    def _loaded(self, key: str, weights: AdapterWeights) -> None:
        """The loader's hand-over (worker thread): cache what it loaded, even if every waiting request gave up; then,
        off the engine thread, give what evictions freed back to the OS (`server.adapters.heap`)."""
        with self._lock:
            self._host.put(key, weights)
            self._record("load", "host")
            self._evict()
        self.trimmer.maybe_trim()

    def _record(self, event: CacheEvent, tier: CacheTier) -> None:
        if self.metrics is not None:
            self.metrics.record_adapter_event(event, tier)

    def _record_load(self, outcome: LoadOutcome, seconds: float | None = None) -> None:
        if self.metrics is not None:
            self.metrics.adapter_tiers.record_load("device", outcome, seconds)

    def _set_resident(self) -> None:
        if self.metrics is not None:
            resident = self._slots.resident()
            self.metrics.set_adapters_resident("host", len(self._host))
            self.metrics.set_adapter_host_bytes(self._host.num_bytes)
            self.metrics.set_adapters_resident("device", len(resident))
            tiers = self.metrics.adapter_tiers
            tiers.set_bytes("host", self._host.num_bytes)
            tiers.set_bytes("device", sum(w.num_bytes for w in map(self._host.get, resident) if w is not None))
