"""The device slot table: which adapter version each of `max_loras` slots holds, who uses it, what may be evicted."""

from __future__ import annotations

from collections.abc import Set
from typing import NamedTuple

from server.adapters.lru import RefLRU


class Binding(NamedTuple):
    """A bound slot: whether the caller must load the adapter into it, and which key it evicted for that."""

    slot: int
    load: bool
    evicted: str | None = None


class DeviceSlots:
    """Slots keyed by adapter key: references are running sequences, pinned keys keep their slot, idle ones go LRU.

    Not thread-safe: `server.adapters.cache.AdapterCache` guards it with its lock.
    """

    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self._table: RefLRU[str, int] = RefLRU(max_loras)  # key -> slot index
        self._free = list(range(max_loras - 1, -1, -1))

    def holds(self, key: str) -> bool:
        return key in self._table

    def resident(self) -> list[str]:
        return self._table.keys()

    def users(self, key: str) -> int:
        return self._table.refs(key)

    def pin(self, key: str, pinned: bool) -> None:
        self._table.pin(key, pinned)

    def fits(self, key: str, in_use: Set[str]) -> bool:
        """Whether `key` can have a slot next to the keys `in_use` (running or admitted), pinned ones holding theirs."""
        if key in in_use:
            return True
        return len(in_use | set(self._table.pinned()) | {key}) <= self.max_loras

    def bind(self, key: str) -> Binding:
        """A slot for one more running sequence of `key`, evicting the least recently used idle key if needed."""
        slot = self._table.hold(key)
        if slot is not None:
            return Binding(slot, load=False)
        victim = None
        if not self._free:
            victim = self._table.oldest_idle()
            if victim is None:
                raise RuntimeError(f"all {self.max_loras} adapter slots are in use; the scheduler must cap them")
            self._free.append(self._table.remove(victim))
        self._table.put(key, slot := self._free.pop(), refs=1)
        return Binding(slot, load=True, evicted=victim)

    def reserve(self, key: str) -> int | None:
        """A free slot for `key` ahead of its first sequence (a prefetch); None if it has one or none is free.

        Evicts nothing: the slot stays idle, so the next `bind` of another key may take it back.
        """
        if key in self._table or not self._free:
            return None
        self._table.put(key, slot := self._free.pop())
        return slot

    @property
    def num_free(self) -> int:
        return len(self._free)

    def unbind(self, key: str) -> int:
        """Drop one running user of `key`; returns how many are left."""
        return self._table.release(key)

    def free(self, key: str) -> None:
        """Unpin `key` and give up its slot now if no running sequence uses it (a replaced or deleted version)."""
        self._table.pin(key, False)
        slot = self._table.remove(key)
        if slot is not None:
            self._free.append(slot)
