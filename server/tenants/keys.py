"""API keys: generated at random, stored only as SHA-256 hashes, looked up in constant time.

A key is 256 random bits, so an unsalted SHA-256 is enough to store it (nobody can brute-force the preimage), and it
lets the server hash a presented key once and compare digests. Keys are never logged: only the first hex digits of
a hash (`key_id`) ever appear in output, to tell keys of one tenant apart.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from typing import Generic, TypeVar

KEY_PREFIX = "lpx-"
HASH_PREFIX = "sha256:"
HASH_PATTERN = re.compile(r"^sha256:[0-9a-f]{64}$")
KEY_ID_CHARS = 12  # hex digits of the hash shown by `loraplex keys list`

T = TypeVar("T")


def new_key() -> str:
    """A fresh API key: the prefix and 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The stored form of a key: `sha256:<64 hex digits>` of its UTF-8 bytes."""
    return HASH_PREFIX + _digest(key).hex()


def key_id(stored: str) -> str:
    """The short public name of a stored key hash."""
    return stored.removeprefix(HASH_PREFIX)[:KEY_ID_CHARS]


def check_hash(stored: str) -> str:
    """Return `stored` if it is a key hash in the stored form, else raise ValueError."""
    if not HASH_PATTERN.match(stored):
        raise ValueError(
            "a key must be stored as 'sha256:' and 64 lowercase hex digits, never in clear; `loraplex keys add` "
            "writes one"
        )
    return stored


class KeyIndex(Generic[T]):
    """Maps key hashes to owners; `find` compares the presented key's digest with every stored one."""

    def __init__(self, entries: Iterable[tuple[str, T]]) -> None:
        self._entries = [(bytes.fromhex(stored.removeprefix(HASH_PREFIX)), owner) for stored, owner in entries]

    def find(self, key: str) -> T | None:
        """The owner of `key`, or None. Constant time in where (and whether) the key is found."""
        digest = _digest(key)
        found = None
        for stored, owner in self._entries:
            # No early exit and no dict lookup: every comparison runs, each in constant time.
            if hmac.compare_digest(digest, stored):
                found = owner
        return found

    def __len__(self) -> int:
        return len(self._entries)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode(errors="surrogatepass")).digest()
