"""Which models a tenant may use: the base model or not, and adapters by exact name or fnmatch-style glob.

Matching is case-sensitive, as adapter names are (`acme-*` does not match `ACME-x`). A name is matched only if it is
a valid adapter name (`server.adapters.store.NAME_PATTERN`), so no path trick (`acme-x/../globex-y`, `./acme-x`,
`%2e%2e`) reaches the glob: `*` in fnmatch also matches `/`, and this check is what keeps it to one folder name.
Patterns may use only adapter-name characters and the glob characters `* ? [ ] !`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from server.adapters.store import NAME_PATTERN

GLOB_PATTERN = re.compile(r"^[A-Za-z0-9._\-*?\[\]!]{1,128}$")


def check_glob(pattern: str) -> str:
    """Return `pattern` if it is a usable adapter glob, else raise ValueError saying what is wrong."""
    if not GLOB_PATTERN.match(pattern):
        raise ValueError(
            f"adapter pattern {pattern!r} may hold only letters, digits, '.', '_', '-' and the glob characters "
            "'* ? [ ] !' (1 to 128 of them)"
        )
    return pattern


@dataclass(frozen=True)
class Scope:
    """The models one tenant may use."""

    adapters: tuple[str, ...]  # exact names and globs
    base_model: bool

    def allows_adapter(self, name: str) -> bool:
        return NAME_PATTERN.fullmatch(name) is not None and any(fnmatchcase(name, p) for p in self.adapters)

    def allows(self, name: str, *, is_base: bool) -> bool:
        """Whether the model `name` (the base model when `is_base`) is visible to the tenant."""
        return self.base_model if is_base else self.allows_adapter(name)
