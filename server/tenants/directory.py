"""The live set of tenants: read from the key file at start, swapped whole on reload, keys resolved in constant time.

A reload builds the new set aside and swaps one reference, so a request sees either the old or the new set, never
a mix; a file that does not parse or check leaves the old set in place and the error says why. A tenant that stays
keeps its usage (its requests in flight and its windows), with the new limits from the next admission on.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from server.errors import KeyFileError
from server.tenants.keyfile import TenantEntry, read_key_file
from server.tenants.keys import KeyIndex, hash_key
from server.tenants.quota import Clock, Lease, Limits, Quota
from server.tenants.scope import Scope

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tenant:
    """One tenant: its name (the metric label), the models it may use and its limits."""

    name: str
    scope: Scope
    limits: Limits

    @classmethod
    def from_entry(cls, entry: TenantEntry) -> Tenant:
        limits = Limits(entry.requests_per_minute, entry.tokens_per_minute, entry.concurrent_requests)
        return cls(entry.name, Scope(tuple(entry.adapters), entry.base_model), limits)


@dataclass(frozen=True)
class Account:
    """A tenant and its live usage."""

    tenant: Tenant
    quota: Quota

    def admit(self) -> Lease:
        """Admit one request within the tenant's limits (QuotaExceededError otherwise); release the lease at its end."""
        return self.quota.admit(self.tenant.limits)


@dataclass(frozen=True)
class Roster:
    """One consistent set of tenants and the index of their keys."""

    accounts: dict[str, Account]
    keys: KeyIndex[Account]


class TenantDirectory:
    """The tenants of one key file; `authenticate` resolves a presented key, `reload` re-reads the file."""

    def __init__(self, path: Path, *, admin_token: str | None = None, clock: Clock = time.monotonic) -> None:
        """Read the file now: KeyFileError if it is invalid (a server must not start with a broken one)."""
        self.path = path
        self.clock = clock
        self._admin_hash = hash_key(admin_token) if admin_token else None
        self._lock = threading.Lock()  # one reload at a time; readers take the current roster without it
        self._roster = self._read({})
        log.info("API keys: %s", self.describe())

    def authenticate(self, key: str) -> Account | None:
        """The account whose key this is, or None."""
        return self._roster.keys.find(key)

    @property
    def tenants(self) -> list[Tenant]:
        return [account.tenant for account in self._roster.accounts.values()]

    @property
    def num_keys(self) -> int:
        return len(self._roster.keys)

    def describe(self) -> str:
        return f"{len(self.tenants)} tenants with {self.num_keys} keys from {self.path}"

    def reload(self) -> None:
        """Re-read the file and swap it in; on KeyFileError the old set stays in force."""
        with self._lock:
            self._roster = self._read(self._roster.accounts)
        log.info("API keys reloaded: %s", self.describe())

    def _read(self, current: dict[str, Account]) -> Roster:
        entries = read_key_file(self.path).tenants
        if self._admin_hash is not None:
            for entry in entries:
                if self._admin_hash in entry.keys:
                    raise KeyFileError(
                        f"API keys file {self.path}: a key of tenant {entry.name!r} is the admin token; the admin "
                        "token must stay separate from every tenant key"
                    )
        accounts = {entry.name: self._account(Tenant.from_entry(entry), current) for entry in entries}
        keys = KeyIndex((key, accounts[entry.name]) for entry in entries for key in entry.keys)
        return Roster(accounts, keys)

    def _account(self, tenant: Tenant, current: dict[str, Account]) -> Account:
        previous = current.get(tenant.name)
        return Account(tenant, previous.quota if previous is not None else Quota(self.clock))
