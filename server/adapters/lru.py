"""A least-recently-used map whose entries carry reference counts and pins: the shape of both adapter tiers.

Host memory keeps loaded adapter weights, referenced by the requests that use them; device slots keep slot indices,
referenced by the running sequences bound to them. In both, an entry in use or pinned is never evicted, and idle
ones go least recently used first (vLLM uses one LRU class for its CPU and GPU adapter tiers the same way).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class _Entry(Generic[V]):
    value: V
    size: int  # bytes it counts against the budget
    refs: int = 0


class RefLRU(Generic[K, V]):
    """Entries by key, least recently used first, bounded by count and bytes; only idle, unpinned ones are evicted.

    Not thread-safe: the owner's lock guards it. Pins are kept by key, so a key can be pinned before it is present.
    """

    def __init__(self, max_entries: int, max_bytes: int | None = None, size_of: Callable[[V], int] | None = None):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.size_of = size_of or (lambda _: 0)
        self.num_bytes = 0
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()  # oldest first
        self._pinned: set[K] = set()

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[K]:
        """Present keys, least recently used first."""
        return list(self._entries)

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.value

    def refs(self, key: K) -> int:
        entry = self._entries.get(key)
        return 0 if entry is None else entry.refs

    def pinned(self) -> list[K]:
        """Present keys that are pinned."""
        return [key for key in self._pinned if key in self._entries]

    def pin(self, key: K, pinned: bool) -> None:
        if pinned:
            self._pinned.add(key)
        else:
            self._pinned.discard(key)

    def hold(self, key: K) -> V | None:
        """One more reference to `key`, now the most recently used; None (and nothing held) when it is absent."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        entry.refs += 1
        self._entries.move_to_end(key)
        return entry.value

    def put(self, key: K, value: V, refs: int = 0) -> None:
        """Add `key` as the most recently used with `refs` references; a present key keeps its entry and references."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(value, self.size_of(value))
            self.num_bytes += entry.size
        entry.refs += refs
        self._entries.move_to_end(key)

    def release(self, key: K) -> int:
        """One reference fewer to `key`; the references left."""
        entry = self._entries.get(key)
        if entry is None:
            return 0
        entry.refs = max(0, entry.refs - 1)
        return entry.refs

    def remove(self, key: K) -> V | None:
        """Take `key` out if nothing references it (pinned or not); its value, or None when absent or in use."""
        entry = self._entries.get(key)
        if entry is None or entry.refs > 0:
            return None
        del self._entries[key]
        self.num_bytes -= entry.size
        return entry.value

    def is_idle(self, key: K) -> bool:
        """Present, unreferenced and unpinned: what may be evicted."""
        entry = self._entries.get(key)
        return entry is not None and entry.refs == 0 and key not in self._pinned

    def oldest_idle(self) -> K | None:
        """The least recently used idle key."""
        return next((key for key in self._entries if self.is_idle(key)), None)

    def over_budget(self) -> bool:
        return len(self._entries) > self.max_entries or (self.max_bytes is not None and self.num_bytes > self.max_bytes)

    def shrink(self, keep: Callable[[K], bool] = lambda _: False) -> list[K]:
        """Evict idle keys not kept, least recently used first, while over the count or byte budget; the evicted."""
        evicted = []
        for key in [k for k in self._entries if self.is_idle(k) and not keep(k)]:
            if not self.over_budget():
                break
            self.remove(key)
            evicted.append(key)
        return evicted
