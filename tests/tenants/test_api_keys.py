"""Keys are random, stored as SHA-256 hashes and found by comparing digests with every stored one."""

from __future__ import annotations

import hashlib

import pytest

from server.tenants.keys import KEY_PREFIX, KeyIndex, check_hash, hash_key, key_id, new_key


def test_new_keys_are_long_random_and_distinct() -> None:
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(key.startswith(KEY_PREFIX) and len(key) == len(KEY_PREFIX) + 43 for key in keys)


def test_hash_is_sha256_of_the_key() -> None:
    assert hash_key("lpx-x") == "sha256:" + hashlib.sha256(b"lpx-x").hexdigest()
    assert check_hash(hash_key("lpx-x")) == hash_key("lpx-x")
    assert key_id(hash_key("lpx-x")) == hashlib.sha256(b"lpx-x").hexdigest()[:12]


@pytest.mark.parametrize("stored", ["lpx-x", "sha256:" + "0" * 63, "SHA256:" + "0" * 64, "sha256:" + "G" * 64, ""])
def test_only_the_stored_form_is_accepted(stored: str) -> None:
    with pytest.raises(ValueError, match="sha256"):
        check_hash(stored)


def test_index_finds_owners_and_nothing_else() -> None:
    keys = [new_key() for _ in range(5)]
    index = KeyIndex((hash_key(key), i) for i, key in enumerate(keys))
    assert [index.find(key) for key in keys] == [0, 1, 2, 3, 4]
    for wrong in ["", keys[0][:-1], keys[0] + "x", keys[0].upper(), hash_key(keys[0]), "ä\udcff"]:
        assert index.find(wrong) is None
    assert len(index) == 5
    assert KeyIndex([]).find(keys[0]) is None
