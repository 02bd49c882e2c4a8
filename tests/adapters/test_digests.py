"""Weight-file digests are remembered per file version: a reload of an unchanged file skips hashing, any change
to the file is hashed again."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

import server.adapters.digests as digests
from server.adapters.digests import FileDigests


@pytest.fixture
def hashed(monkeypatch):
    """The files `file_digest` actually read, in order."""
    reads = []

    def counting(file):
        reads.append(file.name)
        return real(file)

    real = digests.file_digest
    monkeypatch.setattr(digests, "file_digest", counting)
    return reads


def test_an_unchanged_file_is_hashed_once(tmp_path, hashed):
    file = tmp_path / "w.safetensors"
    file.write_bytes(b"x" * 3_000_000)
    cache = FileDigests()
    expected = (3_000_000, hashlib.sha256(file.read_bytes()).hexdigest())
    assert cache(file) == expected and cache(file) == expected
    assert hashed == ["w.safetensors"]


def test_a_rewrite_is_hashed_again_even_with_the_same_size_and_modification_time(tmp_path, hashed):
    file = tmp_path / "w.safetensors"
    file.write_bytes(b"a" * 1000)
    cache = FileDigests()
    first = cache(file)
    stamp = os.stat(file).st_mtime_ns
    time.sleep(0.05)  # past a coarse clock tick: the change time moves
    with file.open("r+b") as f:
        f.write(b"b" * 1000)
    os.utime(file, ns=(stamp, stamp))  # a copy tool restoring the modification time
    second = cache(file)
    assert second == (1000, hashlib.sha256(b"b" * 1000).hexdigest()) and second != first
    assert hashed == ["w.safetensors", "w.safetensors"]


def test_a_replaced_file_is_hashed_again(tmp_path, hashed):
    file, new = tmp_path / "w.safetensors", tmp_path / "new"
    file.write_bytes(b"a" * 1000)
    cache = FileDigests()
    cache(file)
    new.write_bytes(b"c" * 1000)
    os.replace(new, file)  # how the store commits an adapter: a new inode under the old name
    assert cache(file) == (1000, hashlib.sha256(b"c" * 1000).hexdigest())


def test_the_digests_are_bounded_least_recently_used_first(tmp_path, hashed):
    files = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for i, file in enumerate(files):
        file.write_bytes(bytes([i]) * 100)
    cache = FileDigests(max_entries=2)
    cache(files[0]), cache(files[1]), cache(files[0]), cache(files[2])  # files[1] is the least recently used
    assert len(cache) == 2
    hashed.clear()
    cache(files[0]), cache(files[2]), cache(files[1])
    assert hashed == ["1.safetensors"]
