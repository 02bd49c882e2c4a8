"""RefLRU, the cache both adapter tiers are made of, and the device slot table built on it."""

from __future__ import annotations

import pytest

from server.adapters.device_slots import DeviceSlots
from server.adapters.lru import RefLRU


def test_idle_entries_go_least_recently_used_first_over_the_count():
    lru: RefLRU[str, int] = RefLRU(max_entries=2)
    for key in "abc":
        lru.put(key, ord(key))
    assert lru.hold("a") == ord("a") and lru.release("a") == 0  # "a" is now the most recently used
    assert lru.shrink() == ["b"] and lru.keys() == ["c", "a"]


def test_held_and_pinned_entries_are_never_evicted():
    lru: RefLRU[str, int] = RefLRU(max_entries=1)
    lru.put("held", 1, refs=1)
    lru.put("pinned", 2)
    lru.pin("pinned", True)
    lru.put("idle", 3)
    assert lru.shrink() == ["idle"] and sorted(lru.keys()) == ["held", "pinned"]
    assert lru.over_budget()  # what is in use may take the cache over its budget
    assert lru.remove("held") is None and lru.oldest_idle() is None
    lru.release("held")
    lru.pin("pinned", False)
    assert lru.shrink() == ["held"] and lru.keys() == ["pinned"]


def test_the_byte_budget_counts_each_entry_once():
    lru: RefLRU[str, bytes] = RefLRU(max_entries=10, max_bytes=10, size_of=len)
    lru.put("a", b"12345")
    lru.put("a", b"12345", refs=1)  # present: keeps its entry and gains a reference
    lru.put("b", b"123456")
    assert lru.num_bytes == 11 and lru.refs("a") == 1
    assert lru.shrink() == ["b"] and lru.num_bytes == 5


def test_a_pin_set_before_the_key_arrives_applies_once_it_does():
    lru: RefLRU[str, int] = RefLRU(max_entries=0)
    lru.pin("a", True)
    assert lru.pinned() == []
    lru.put("a", 1)
    assert lru.pinned() == ["a"] and lru.shrink() == [] and lru.get("a") == 1


def test_device_slots_reuse_the_least_recently_used_idle_slot():
    slots = DeviceSlots(max_loras=2)
    first, second = slots.bind("a@1"), slots.bind("b@1")
    assert (first.load, second.load) == (True, True) and {first.slot, second.slot} == {0, 1}
    assert slots.bind("a@1") == (first.slot, False, None)
    with pytest.raises(RuntimeError, match="in use"):
        slots.bind("c@1")
    slots.unbind("b@1")
    assert slots.bind("c@1") == (second.slot, True, "b@1")


def test_a_pinned_slot_counts_against_admission_and_a_freed_key_gives_its_slot_back():
    slots = DeviceSlots(max_loras=2)
    slots.pin("p@1", True)
    assert slots.fits("x@1", {"y@1"})  # not resident yet: the pin holds no slot
    slots.bind("p@1")
    slots.unbind("p@1")
    assert not slots.fits("x@1", {"y@1"}) and slots.fits("x@1", set())
    slots.free("p@1")
    assert slots.resident() == [] and slots.fits("x@1", {"y@1"})
