"""The engine facade's adapter half: every way into the adapter registry from outside the engine (the admin API,
vLLM's adapter routes, Ray Serve replicas). Requests take theirs in `AsyncEngine.generate`. One way in, so that
every load is deduplicated, bounded and queued with the others (`server.adapters.loader`).
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractContextManager
from typing import BinaryIO

from server.adapters.registry import AdapterRegistry
from server.adapters.store import Mode
from server.adapters.versions import AdapterView
from server.threads import single_threaded


class AdapterFacade:
    """Adapter administration and prefetch, through the registry `adapters` (set by `AsyncEngine`)."""

    adapters: AdapterRegistry

    def upload_slot(self) -> AbstractContextManager[None]:
        """Admit one adapter upload; QueueFullError (429) while `max_concurrent_uploads` are being checked."""
        return self.adapters.upload_slot()

    async def add_adapter(
        self, name: str, config: BinaryIO, weights: BinaryIO, *, replace: bool, mode: Mode | None, pinned: bool | None
    ) -> AdapterView:
        """Check an uploaded adapter and serve it as `name`; the checks run in a worker thread on one core."""
        add = self.adapters.add
        return await asyncio.to_thread(single_threaded, add, name, config, weights, replace=replace, mode=mode,
                                       pinned=pinned)  # fmt: skip

    def adapter_views(self) -> list[AdapterView]:
        """Every adapter of the store with its record, settings and live state."""
        return self.adapters.views()

    def adapter_view(self, name: str) -> AdapterView:
        return self.adapters.view(name)

    def update_adapter(self, name: str, mode: Mode | None, pinned: bool | None) -> AdapterView:
        """Change an adapter's merge mode or pin (None keeps it)."""
        return self.adapters.update(name, mode, pinned)

    def remove_adapter(self, name: str) -> None:
        """Take an adapter out of the store; its running requests finish."""
        self.adapters.remove(name)

    async def prefetch_adapter(self, name: str) -> None:
        """Load `name` into host memory ahead of its requests, sharing a load in flight; NotFoundError if unknown.

        The one way in for callers other than a request (Ray's multiplexed loader, a pin elsewhere), so their
        loads are deduplicated and bounded with the requests' own.
        """
        await self.adapters.prefetch(name)

    def refresh_adapter(self, name: str) -> None:
        """Serve `name` as the store holds it now, as a new version (another process changed it, or it is
        unloaded here); running requests keep the version they hold."""
        self.adapters.refresh(name)
