"""The device slot table: which adapter version each of `max_loras` slots holds, who uses it, what may be evicted."""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Set
from typing import NamedTuple


class Binding(NamedTuple):
    """A bound slot: whether the caller must load the adapter into it, and which key it evicted for that."""

    slot: int
    load: bool
    evicted: str | None = None


class DeviceSlots:
    """Slots keyed by adapter key (name and version), with running users per key, pins, and LRU among idle keys."""

    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # LRU order, oldest first
        self._users: Counter[str] = Counter()  # running sequences bound to each key
        self._pinned: set[str] = set()  # never evicted while resident
        self._free = list(range(max_loras - 1, -1, -1))
        self._lock = threading.Lock()

    def holds(self, key: str) -> bool:
        with self._lock:
            return key in self._slot_of

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._slot_of)

    def users(self, key: str) -> int:
        with self._lock:
            return self._users[key]

    def pin(self, key: str, pinned: bool) -> None:
        with self._lock:
            if pinned:
                self._pinned.add(key)
            else:
                self._pinned.discard(key)

    def fits(self, key: str, in_use: Set[str]) -> bool:
        """Whether `key` can have a slot next to the keys `in_use` (running or admitted), pinned ones holding theirs."""
        if key in in_use:
            return True
        with self._lock:
            pinned = {k for k in self._pinned if k in self._slot_of}
        return len(in_use | pinned | {key}) <= self.max_loras

    def bind(self, key: str) -> Binding:
        """A slot for one more running sequence of `key`, evicting the least recently used idle key if needed."""
        with self._lock:
            if key in self._slot_of:
                self._users[key] += 1
                self._slot_of.move_to_end(key)
                return Binding(self._slot_of[key], load=False)
            victim = None
            if not self._free:
                victim = next((k for k in self._slot_of if not self._users[k] and k not in self._pinned), None)
                if victim is None:
                    raise RuntimeError(f"all {self.max_loras} adapter slots are in use; the scheduler must cap them")
                self._free.append(self._slot_of.pop(victim))
            self._users[key] += 1
            self._slot_of[key] = slot = self._free.pop()
            return Binding(slot, load=True, evicted=victim)

    def unbind(self, key: str) -> int:
        """Drop one running user of `key`; returns how many are left."""
        with self._lock:
            if self._users[key] > 0:
                self._users[key] -= 1
            left = self._users[key]
            if not left:
                self._users.pop(key, None)
            return left

    def free(self, key: str) -> None:
        """Give up the slot of `key` now if no running sequence uses it (a replaced or deleted version)."""
        with self._lock:
            self._pinned.discard(key)
            if key in self._slot_of and not self._users[key]:
                self._free.append(self._slot_of.pop(key))
