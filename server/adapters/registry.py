"""The adapter registry: the serving cache of adapter versions plus the admin operations that change the store.

Adding, replacing and removing adapters change the store atomically (see `server.adapters.store`) and give the cache
a new current version; requests already running keep the version they hold.
"""

from __future__ import annotations

import logging
from typing import BinaryIO

from server.adapters.cache import AdapterCache
from server.adapters.records import AdapterRecord, describe_adapter_dir
from server.adapters.store import AdapterMeta, Mode, check_name, now
from server.adapters.validation import StagedAdapter, stage_adapter
from server.adapters.versions import AdapterState, AdapterView, Tier, adapter_key, adapter_name
from server.errors import ConflictError, LoraplexError, NotFoundError

log = logging.getLogger(__name__)


class AdapterRegistry(AdapterCache):
    """The adapter cache, and the operations that add, replace, change, describe and remove adapters."""

    def add(
        self, name: str, config: BinaryIO, weights: BinaryIO, *, replace: bool, mode: Mode | None,
        pinned: bool | None, max_adapter_bytes: int,
    ) -> AdapterView:  # fmt: skip
        """Check an uploaded adapter, then make it the current version of `name`: atomically, warm in host memory.

        Unless given, a replacement keeps the mode and pin of the adapter it replaces.
        """
        if not replace and self.store.exists(check_name(name)):
            raise ConflictError(f"adapter {name!r} already exists; send replace=true to overwrite it", param="name")
        staged = stage_adapter(self.store, config, weights, max_adapter_bytes, self.info, self.max_lora_rank)
        try:
            self._install(name, staged, replace, mode, pinned)
        finally:
            self.store.purge(staged.path)  # nothing left there once committed
        return self.view(name)

    def _install(self, name: str, staged: StagedAdapter, replace: bool, mode: Mode | None, pinned: bool | None) -> None:
        """Commit a staged adapter as `name` and make it the current version, retiring the one it replaces."""
        with self._admin:
            with self._lock:
                prior = self._state(name) if self.store.exists(name) else self._states.get(name)
                base = prior.meta if prior is not None and replace else AdapterMeta()
                meta = AdapterMeta(mode or base.mode, base.pinned if pinned is None else pinned, now())
                self._check_pin(name, meta)
            self.store.write_meta(staged.path, meta)
            with self._lock:
                aside = self.store.commit(staged.path, name, replace)
                state = self._states[name] = AdapterState(next(self._versions), meta, staged.record)
                if prior is not None:
                    state.served, state.last_used = prior.served, prior.last_used
                    self._retire(adapter_key(name, prior.version))
                key = adapter_key(name, state.version)
                self._host.put(key, staged.weights)
                self.slots.pin(key, meta.pinned)
                self._evict_host()
            self.store.purge(aside)
        log.info("added adapter %s as %s (sha256 %s)", name, key, staged.record.sha256)

    def update(self, name: str, mode: Mode | None, pinned: bool | None) -> AdapterView:
        """Change an adapter's mode or pin; persisted in its folder. Pinning loads it into host memory ahead."""
        with self._admin:
            with self._lock:
                state = self._state(name)
                meta = AdapterMeta(
                    mode or state.meta.mode, state.meta.pinned if pinned is None else pinned, state.meta.created_at
                )
                self._check_pin(name, meta)
            self.store.write_meta(self.store.path(name), meta)
            with self._lock:
                state.meta = meta
                key = adapter_key(name, state.version)
                self.slots.pin(key, meta.pinned)
                if meta.pinned and key not in self._host:
                    self._loader.load(key)  # warm it ahead of its first request
                self._evict_host()
        return self.view(name)

    def remove(self, name: str) -> None:
        """Take `name` out of the store; running requests finish on the weights they hold, new ones get 404."""
        with self._admin:
            with self._lock:
                self._state(name)
                hidden = self.store.detach(name)
                self._drop(name)
            self.store.purge(hidden)
        log.info("removed adapter %s", name)

    def refresh(self, name: str) -> None:
        """Serve `name` as the store holds it now, as a new version: another process sharing the store changed it,
        or this one unloads it. Requests running keep the version they hold; the old one is freed when they end.
        """
        with self._admin, self._lock:
            self._drop(name)
            if self.store.exists(name):
                self._register(name)

    def view(self, name: str) -> AdapterView:
        """The record (read from disk the first time), settings and live state of `name`."""
        with self._lock:
            state = self._state(name)
            record = state.record
        error = None
        if record is None:
            try:
                record = state.record = describe_adapter_dir(self.store.path(name))
            except LoraplexError as exc:
                error = exc.message
        with self._lock:
            return self._view(name, state, record, error)

    def views(self) -> list[AdapterView]:
        with self._lock:
            names = self._sync()
        views = []
        for name in names:
            try:
                views.append(self.view(name))
            except NotFoundError:  # removed meanwhile
                continue
        return views

    def _check_pin(self, name: str, meta: AdapterMeta) -> None:
        others = sum(s.meta.pinned for n, s in self._states.items() if n != name)
        if meta.pinned and others >= self.max_pinned:
            raise ConflictError(
                f"at most {self.max_pinned} adapters can be pinned (max_loras - 1, so one device slot serves "
                "the rest); unpin another adapter first",
                param="pinned",
            )

    def _view(self, name: str, state: AdapterState, record: AdapterRecord | None, error: str | None) -> AdapterView:
        key = adapter_key(name, state.version)
        tier: Tier = "device" if self.slots.holds(key) else "host" if key in self._host else "disk"
        keys = [k for k in self._requests if adapter_name(k) == name]
        running = sum(self.slots.users(k) for k in keys)
        waiting = max(0, sum(self._requests[k] for k in keys) - running)
        return AdapterView(name, state.meta, record, error, tier, running, waiting, state.served, state.last_used)
