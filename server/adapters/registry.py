"""The adapter registry: every adapter of the store, its current version, and the operations that change them.

Requests hold an adapter *key*, `name@version`, never a bare name. Adding or replacing an adapter gives its files a
new version, so sequences already running keep the old version's host entry and device slot while new requests get
the new one; the old version leaves the cache when its last user finishes. The registry has an `AdapterCache` (the
host and device tiers, by key) and tells it which versions are current. While a replacement swaps the folders on
disk, requests keep resolving the adapter to its old version; one that finds the files gone waits for the swap and
takes the new version, so no request for an adapter being replaced sees a 404.

Locks, always taken in this order; no request for generation waits on one held across file I/O:
1. `_admin`: one store change at a time (add, replace, update, remove). Held across file I/O, so only the admin
   operations that change the store take it.
2. `_lock`: the adapter states. Held briefly, never across file I/O.
3. the cache's lock, then its loader's (`server.adapters.cache`): bookkeeping only.
The store's own lock is taken only inside store calls, with neither 2 nor 3 held.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import TYPE_CHECKING, BinaryIO

from torch import nn

from server.adapters.cache import AdapterCache
from server.adapters.digests import FileDigests
from server.adapters.limits import AdapterLimits
from server.adapters.records import describe_adapter_dir
from server.adapters.store import AdapterMeta, AdapterStore, Mode, check_name, now
from server.adapters.validation import StagedAdapter, load_from_store, stage_adapter
from server.adapters.versions import AdapterState, AdapterView, adapter_key, adapter_name
from server.adapters.weights import WEIGHTS_FILE, AdapterWeights, ModelInfo
from server.errors import ConflictError, LoraplexError, NotFoundError, QueueFullError

if TYPE_CHECKING:
    from server.metrics import Metrics

log = logging.getLogger(__name__)

ACQUIRE_TRIES = 3  # a request follows at most this many replacements that land while its adapter loads
UPLOAD_RETRY_S = 2


class AdapterRegistry:
    """The adapters of the store and their versions: what requests acquire, and what the admin API changes."""

    def __init__(
        self, store: AdapterStore, model: nn.Module, info: ModelInfo, limits: AdapterLimits,
        metrics: Metrics | None = None,
    ) -> None:  # fmt: skip
        self.store = store
        self.info = info
        self.limits = limits
        self.max_pinned = limits.max_loras - 1  # one slot always serves the unpinned adapters
        self.digests = FileDigests()  # a reload of an unchanged file skips hashing it
        self.cache = AdapterCache(
            model, self._read, limits.max_loras, limits.max_cpu_loras, limits.max_cpu_lora_bytes, metrics,
            size=self._size, max_load_bytes=limits.max_adapter_bytes,  # loads in flight: one largest upload's worth
        )  # fmt: skip
        self._admin = threading.Lock()
        self._lock = threading.Lock()
        self._states: dict[str, AdapterState] = {}
        self._next_version = 1
        self._uploads = threading.BoundedSemaphore(limits.max_concurrent_uploads)
        self._sync()

    # --- lookups ----------------------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        """Whether `name` is served: its folder is in the store, or a replacement is swapping it."""
        since = self._version_mark()
        if self.store.exists(name):
            return True
        with self._lock:
            state = self._states.get(name)
            return state is not None and self._outlives_disk(state, since)

    def listing(self) -> list[tuple[str, int]]:
        """(name, created_at) of every adapter in the store, sorted by name."""
        names = self._sync()
        with self._lock:
            return [(name, self._states[name].meta.created_at) for name in names if name in self._states]

    def mode(self, adapter: str) -> Mode:
        """The merge mode of an adapter, by name or key; 'unmerged' for one the registry no longer serves."""
        with self._lock:
            state = self._states.get(adapter_name(adapter))
            return "unmerged" if state is None else state.meta.mode

    def view(self, name: str) -> AdapterView:
        """The record (read from disk the first time), settings and live state of `name`."""
        state = self._current(name)
        record, error = state.record, None
        if record is None:
            try:
                record = describe_adapter_dir(self.store.path(name))
            except LoraplexError as exc:
                error = exc.message
            with self._lock:
                state.record = state.record or record
        tier, running, held = self.cache.usage(name, adapter_key(name, state.version))
        with self._lock:
            meta, served, last_used = state.meta, state.served, state.last_used
        return AdapterView(name, meta, record, error, tier, running, max(0, held - running), served, last_used)

    def views(self) -> list[AdapterView]:
        views = []
        for name in self._sync():
            try:
                views.append(self.view(name))
            except NotFoundError:  # removed meanwhile
                continue
        return views

    # --- requests (event loop) --------------------------------------------------------------------------------
    async def acquire(self, name: str) -> str:
        """Hold the current version of `name` in host memory for one request, loading it off-thread if cold.

        Returns the key the request runs with; hand it back to `release` when the request ends.
        """
        for _ in range(ACQUIRE_TRIES):
            state = self._current(name)
            key = adapter_key(name, state.version)
            try:
                await self.cache.hold(key)
            except LoraplexError:
                if await self._replaced(name, state):
                    continue  # the files changed under the load: take the version that replaced them
                raise
            with self._lock:
                state.last_used = time.time()
            return key
        raise ConflictError(f"adapter {name!r} kept changing while it loaded; retry", param="model")

    async def prefetch(self, name: str) -> None:
        """Load the current version of `name` into host memory ahead of its requests, without holding it.

        Shares a load in flight; raises what the load raises (NotFoundError for an adapter not in the store). A
        version replaced while it loads is followed, as `acquire` does; past that the requests load it themselves.
        """
        for _ in range(ACQUIRE_TRIES):
            state = self._current(name)
            load = self.cache.warm(adapter_key(name, state.version))
            if load is None:
                return
            try:  # shielded: this caller giving up must not cancel a load requests may share
                await asyncio.shield(asyncio.wrap_future(load))
                return
            except LoraplexError:
                if not await self._replaced(name, state):
                    raise

    def release(self, key: str) -> None:
        """End one request's hold on `key`."""
        self.cache.release(key)
        with self._lock:
            state = self._states.get(adapter_name(key))
            if state is not None:
                state.served += 1
                state.last_used = time.time()

    def shutdown(self) -> None:
        self.cache.shutdown()

    # --- admin operations (worker threads) --------------------------------------------------------------------
    @contextmanager
    def upload_slot(self) -> Iterator[None]:
        """Admit one upload while fewer than `max_concurrent_uploads` run; QueueFullError (429) otherwise."""
        if not self._uploads.acquire(blocking=False):
            raise QueueFullError(
                f"{self.limits.max_concurrent_uploads} adapter uploads are being checked, the most this server "
                "takes at once (--max-concurrent-uploads); retry shortly",
                retry_after_s=UPLOAD_RETRY_S,
            )
        try:
            yield
        finally:
            self._uploads.release()

    def add(
        self, name: str, config: BinaryIO, weights: BinaryIO, *, replace: bool, mode: Mode | None, pinned: bool | None
    ) -> AdapterView:
        """Check an uploaded adapter, then make it the current version of `name`: atomically, warm in host memory.

        Unless given, a replacement keeps the mode and pin of the adapter it replaces.
        """
        if not replace and self.store.exists(check_name(name)):
            raise ConflictError(f"adapter {name!r} already exists; send replace=true to overwrite it", param="name")
        limits = self.limits
        staged = stage_adapter(self.store, config, weights, limits.max_adapter_bytes, self.info, limits.max_lora_rank)
        try:
            self._install(name, staged, replace, mode, pinned)
        finally:
            self.store.purge(staged.path)  # nothing left there once committed
        return self.view(name)

    def update(self, name: str, mode: Mode | None, pinned: bool | None) -> AdapterView:
        """Change an adapter's mode or pin; persisted in its folder. Pinning loads it into host memory ahead."""
        with self._admin:
            state = self._current(name)
            with self._lock:
                old = state.meta
                meta = AdapterMeta(mode or old.mode, old.pinned if pinned is None else pinned, old.created_at)
                self._check_pin(name, meta)
            self.store.write_meta(self.store.path(name), meta)
            with self._lock:
                state.meta = meta
            key = adapter_key(name, state.version)
            self.cache.pin(key, meta.pinned)
            if meta.pinned:
                self.cache.warm(key)
        return self.view(name)

    def remove(self, name: str) -> None:
        """Take `name` out of the store; running requests finish on the weights they hold, new ones get 404."""
        with self._admin:
            self._current(name)
            hidden = self.store.detach(name)
            with self._lock:
                self._drop(name)
        self.store.purge(hidden)  # a hidden folder of its own: no other change waits for its deletion
        log.info("removed adapter %s", name)

    def refresh(self, name: str) -> None:
        """Serve `name` as the store holds it now, as a new version: another process sharing the store changed it,
        or this one unloads it. Requests running keep the version they hold; the old one is freed when they end.
        """
        with self._admin:
            with self._lock:
                self._drop(name)
            if self.store.exists(name):
                self._register(name)

    # --- internals ----------------------------------------------------------------------------------------------
    def _install(self, name: str, staged: StagedAdapter, replace: bool, mode: Mode | None, pinned: bool | None) -> None:
        """Commit a staged adapter as `name` and make it the current version, retiring the one it replaces."""
        with self._admin:
            prior = self._current(name) if replace and self.store.exists(name) else None
            with self._lock:
                base = prior.meta if prior is not None else AdapterMeta()
                meta = AdapterMeta(mode or base.mode, base.pinned if pinned is None else pinned, now())
                self._check_pin(name, meta)
                version = self._take_version()
            key = adapter_key(name, version)
            self.store.write_meta(staged.path, meta)
            self.cache.put(key, staged.weights)  # warm before any request can resolve to it
            self.cache.pin(key, meta.pinned)
            swapped: Future[None] = Future()
            with self._lock:
                if prior is not None:
                    prior.replacing = swapped
            try:
                aside = self.store.commit(staged.path, name, replace)
                with self._lock:
                    old = self._states.get(name)
                    state = self._states[name] = AdapterState(version, meta, staged.record)
                    if old is not None:
                        state.served, state.last_used = old.served, old.last_used
                        self.cache.retire(adapter_key(name, old.version))
            except BaseException:
                self.cache.retire(key)
                raise
            finally:
                with self._lock:
                    if prior is not None:
                        prior.replacing = None
                swapped.set_result(None)  # requests whose load failed mid-swap retry now
        self.store.purge(aside)  # a hidden folder of its own: no other change waits for its deletion
        log.info("added adapter %s as %s (sha256 %s)", name, key, staged.record.sha256)

    def _current(self, name: str) -> AdapterState:
        """The state of `name`, registering a folder dropped in by hand; NotFoundError when it is not served."""
        since = self._version_mark()
        present = self.store.exists(name)  # file I/O, outside the lock
        with self._lock:
            state = self._states.get(name)
            if state is not None and (present or self._outlives_disk(state, since)):
                return state
            if not present:
                self._drop(name)
                raise NotFoundError(f"adapter {name!r} is not in the store", param="name")
        return self._register(name)

    def _register(self, name: str) -> AdapterState:
        meta = self.store.read_meta(name)  # file I/O, outside the lock
        with self._lock:
            state = self._states.get(name)
            if state is not None:
                return state
            if meta.pinned and sum(s.meta.pinned for s in self._states.values()) >= self.max_pinned:
                log.warning("not pinning adapter %s: at most %d adapters can be pinned", name, self.max_pinned)
                meta = AdapterMeta(meta.mode, False, meta.created_at)
            state = self._states[name] = AdapterState(self._take_version(), meta)
        self.cache.pin(adapter_key(name, state.version), meta.pinned)
        return state

    def _sync(self) -> list[str]:
        """Match the states to the folders on disk (adapters dropped in or removed by hand); the names served."""
        since = self._version_mark()
        on_disk = self.store.names()  # file I/O, outside the lock
        with self._lock:
            swapping = {name for name, state in self._states.items() if self._outlives_disk(state, since)}
            for name in set(self._states) - set(on_disk) - swapping:
                self._drop(name)
            new = [name for name in on_disk if name not in self._states]
        for name in new:
            try:
                self._register(name)
            except NotFoundError:  # removed meanwhile
                continue
        return sorted(set(on_disk) | swapping)

    async def _replaced(self, name: str, state: AdapterState) -> bool:
        """Whether `state` stopped being current (waiting out a replacement in progress): its load may then fail."""
        with self._lock:
            swap = state.replacing
        if swap is not None:
            await asyncio.wrap_future(swap)
        with self._lock:
            return self._states.get(name) is not state

    def _read(self, key: str) -> AdapterWeights:
        """Load `key` from the store (the loader's worker thread); the record is kept if it is still current."""
        name = adapter_name(key)
        weights, record = load_from_store(self.store, name, self.info, self.limits.max_lora_rank, self.digests)
        with self._lock:
            state = self._states.get(name)
            if state is not None and adapter_key(name, state.version) == key:
                state.record = record
        return weights

    def _size(self, key: str) -> int:
        """Bytes of `key`'s weights file (the loader's worker thread), 0 if it is gone: the read will say why."""
        try:
            return (self.store.path(adapter_name(key)) / WEIGHTS_FILE).stat().st_size
        except (OSError, LoraplexError):
            return 0

    def _version_mark(self) -> int:
        with self._lock:
            return self._next_version

    # --- internals: call with self._lock held -----------------------------------------------------------------
    def _outlives_disk(self, state: AdapterState, since: int) -> bool:
        """Served although a look at the disk that began at version `since` missed its folder: being swapped in."""
        return state.replacing is not None or state.version >= since

    def _take_version(self) -> int:
        version, self._next_version = self._next_version, self._next_version + 1
        return version

    def _drop(self, name: str) -> None:
        state = self._states.pop(name, None)
        if state is not None:
            self.cache.retire(adapter_key(name, state.version))

    def _check_pin(self, name: str, meta: AdapterMeta) -> None:
        others = sum(s.meta.pinned for n, s in self._states.items() if n != name)
        if meta.pinned and others >= self.max_pinned:
            raise ConflictError(
                f"at most {self.max_pinned} adapters can be pinned (max_loras - 1, so one device slot serves "
                "the rest); unpin another adapter first",
                param="pinned",
            )
