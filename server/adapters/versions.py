"""Names for adapter versions and the records the registry keeps about them."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal

from server.adapters.records import AdapterRecord
from server.adapters.store import AdapterMeta

KEY_SEPARATOR = "@"  # never in a name, so a key splits back unambiguously
Tier = Literal["disk", "host", "device"]


def adapter_key(name: str, version: int) -> str:
    return f"{name}{KEY_SEPARATOR}{version}"


def adapter_name(key: str) -> str:
    """The adapter name of a key (a name is its own name)."""
    return key.split(KEY_SEPARATOR, 1)[0]


@dataclass
class AdapterState:
    """The current version of one adapter, the operator's settings for it and its traffic."""

    version: int
    meta: AdapterMeta
    record: AdapterRecord | None = None  # known once its files were read
    served: int = 0  # requests finished, any version
    last_used: float | None = None  # unix time
    replacing: Future[None] | None = None  # set while a replacement renames its folders; done once it is current


@dataclass(frozen=True)
class AdapterView:
    """An adapter as the admin API shows it: its record, its settings and its live state."""

    name: str
    meta: AdapterMeta
    record: AdapterRecord | None
    error: str | None  # why its files cannot be read, for a broken folder dropped in by hand
    tier: Tier  # where its current version is
    running: int  # requests in the running batch, any version
    waiting: int  # requests admitted by the API and not running yet
    served: int
    last_used: float | None
