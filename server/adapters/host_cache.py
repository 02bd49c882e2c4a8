"""Adapter versions loaded into host memory, held by the requests that use them, evicted least recently used first."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from server.adapters.versions import HostEntry
from server.adapters.weights import AdapterWeights


class HostCache:
    """An LRU of host entries by adapter key; not thread-safe on its own (the registry's lock guards it)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, HostEntry] = OrderedDict()  # oldest first

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def hold(self, key: str) -> bool:
        """Hold `key` for one more request if it is cached; False when it must be loaded first."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        entry.in_flight += 1
        self._entries.move_to_end(key)
        return True

    def hold_loaded(self, key: str, entry: HostEntry) -> None:
        """Hold a freshly loaded entry, putting it back if it was evicted before its requests took it."""
        self._entries.setdefault(key, entry).in_flight += 1
        self._entries.move_to_end(key)

    def put(self, key: str, weights: AdapterWeights) -> HostEntry:
        entry = self._entries[key] = HostEntry(weights)
        return entry

    def unhold(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.in_flight -= 1

    def weights(self, key: str) -> AdapterWeights:
        return self._entries[key].weights

    def evict(self, keep: Callable[[str], bool], outdated: Callable[[str], bool]) -> int:
        """Drop idle entries not kept: outdated ones at once, the rest oldest first while over capacity."""
        evicted = 0
        for key in [k for k, e in self._entries.items() if e.in_flight <= 0 and not keep(k)]:
            if outdated(key) or len(self._entries) > self.capacity:
                del self._entries[key]
                evicted += 1
        return evicted
