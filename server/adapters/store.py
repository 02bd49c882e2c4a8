"""The on-disk adapter store: one PEFT folder per adapter under a root directory, names checked, paths confined."""

from __future__ import annotations

import re
from pathlib import Path

from server.errors import InvalidRequestError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CONFIG_FILE = "adapter_config.json"


def check_name(name: str) -> str:
    """`name` if it is a valid adapter name, else InvalidRequestError saying what a name may contain."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise InvalidRequestError(
            f"invalid adapter name {name!r}: use 1-64 ASCII letters, digits, '.', '_' or '-', starting with a "
            "letter or digit",
            param="name",
        )
    return name


class AdapterStore:
    """Reads the store directory; every path it hands out is resolved and checked to stay inside the root."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def path(self, name: str) -> Path:
        path = (self.root / check_name(name)).resolve()
        if path.parent != self.root:
            raise InvalidRequestError(f"adapter name {name!r} leaves the store", param="name")
        return path

    def exists(self, name: str) -> bool:
        try:
            return (self.path(name) / CONFIG_FILE).is_file()
        except InvalidRequestError:
            return False

    def names(self) -> list[str]:
        """Adapters on disk: folders with a valid name and an adapter_config.json, sorted."""
        if not self.root.is_dir():
            return []
        found = (p.name for p in self.root.iterdir() if p.is_dir() and NAME_PATTERN.fullmatch(p.name))
        return sorted(name for name in found if (self.root / name / CONFIG_FILE).is_file())

    def created(self, name: str) -> int:
        """Unix time the adapter's folder last changed."""
        return int(self.path(name).stat().st_mtime)
