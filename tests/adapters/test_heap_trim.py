"""Evicted adapters' memory goes back to the OS: `HeapTrimmer` trims once per `every_bytes` freed."""

from __future__ import annotations

import sys

import pytest

from server.adapters.heap import HeapTrimmer, malloc_trim


def test_trims_once_enough_was_freed_and_counts_again_from_zero():
    calls: list[None] = []
    trimmer = HeapTrimmer(every_bytes=100, trim=lambda: calls.append(None))
    trimmer.freed(60)
    assert not trimmer.maybe_trim() and calls == []
    trimmer.freed(40)
    assert trimmer.maybe_trim() and len(calls) == 1 and trimmer.num_trims == 1
    assert not trimmer.maybe_trim() and len(calls) == 1  # freed counts from zero after a trim


def test_without_malloc_trim_nothing_is_trimmed():
    trimmer = HeapTrimmer(every_bytes=1, trim=None)
    trimmer.freed(10)
    assert not trimmer.maybe_trim() and trimmer.num_trims == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_glibc_malloc_trim_is_found_and_runs():
    trim = malloc_trim()
    assert trim is not None
    trim()
