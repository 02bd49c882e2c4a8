"""The on-disk adapter store: one PEFT folder per adapter under a root directory, names checked, paths confined.

Every change is atomic: a new adapter is written into a hidden staging folder inside the root, fsynced, then renamed
into place; a replacement renames the old folder aside first and deletes it last; a deletion renames the folder
aside, then deletes it. A crash at any point leaves hidden folders that `recover()` resolves at the next start, so
the store reads as it was before the interrupted change, or as after it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import stat
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

from server.adapters.safe_json import parse_json_object
from server.errors import ConflictError, InvalidRequestError, NotFoundError

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CONFIG_FILE = "adapter_config.json"
META_FILE = "loraplex.json"  # loraplex's own settings of an adapter; optional, PEFT folders work without it
STAGING_PREFIX = ".tmp-"  # a change being written; incomplete by definition after a crash
ASIDE_PREFIX = ".old-"  # `.old-<token>-<name>`: the previous folder of a replacement in progress
DELETED_PREFIX = ".del-"  # a deletion in progress
TOKEN_CHARS = 8
MAX_META_BYTES = 4096  # loraplex.json is one short line; a longer one is not ours

Mode = Literal["unmerged", "merged", "auto"]
MODES: tuple[Mode, ...] = get_args(Mode)
DEFAULT_MODE: Mode = "unmerged"  # merged mode is opt-in, per adapter


def check_name(name: str) -> str:
    """`name` if it is a valid adapter name, else InvalidRequestError saying what a name may contain."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise InvalidRequestError(
            f"invalid adapter name {name!r}: use 1-64 ASCII letters, digits, '.', '_' or '-', starting with a "
            "letter or digit",
            param="name",
        )
    return name


@dataclass(frozen=True)
class AdapterMeta:
    """What an operator chose for an adapter, kept in its folder's loraplex.json."""

    mode: Mode = DEFAULT_MODE
    pinned: bool = False
    created_at: int = 0  # unix time it was added


RACY_NS = 2 * 10**9  # a root changed less than this ago may change again within one timestamp tick


@dataclass(frozen=True)
class _Scan:
    """The store's folders as one scan found them: the root's mtime then, the adapters, the folders without config."""

    mtime_ns: int
    listed: tuple[str, ...]
    bare: frozenset[str]


class AdapterStore:
    """Reads and atomically changes the store directory; every path it hands out stays inside the root."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self._lock = threading.Lock()  # one commit or detach at a time, so existence checks hold until the rename
        self._scan: _Scan | None = None  # the last listing of the root, while it stands (`names`)

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
        """Adapters on disk: folders with a valid name and an adapter_config.json, sorted; hidden folders skipped.

        A listing reads the folders again only when the root changed (its mtime: a folder was added, removed or
        renamed) or changed within `RACY_NS` of the last scan, when a second change could share its timestamp. A
        folder that had no config at the last scan is looked at every time, as its config may have come since
        without touching the root; an adapter leaves the listing when its folder is removed or renamed.
        """
        try:
            root = os.stat(self.root)
        except OSError:  # as `Path.is_dir` had it: no readable root, no adapters
            return []
        if not stat.S_ISDIR(root.st_mode):
            return []
        scan = self._scan
        if scan is None or scan.mtime_ns != root.st_mtime_ns:
            scan = self._rescan(root.st_mtime_ns)
        elif scan.bare:
            gained = {name for name in scan.bare if self._has_config(name)}
            if gained:
                scan = _Scan(scan.mtime_ns, tuple(sorted({*scan.listed, *gained})), scan.bare - gained)
                self._scan = scan
        return list(scan.listed)

    def _rescan(self, mtime_ns: int) -> _Scan:
        with os.scandir(self.root) as entries:  # the entry's type comes with it: no stat per folder of thousands
            found = [e.name for e in entries if NAME_PATTERN.fullmatch(e.name) and e.is_dir()]
        listed = sorted(name for name in found if self._has_config(name))
        scan = _Scan(mtime_ns, tuple(listed), frozenset(found) - set(listed))
        self._scan = scan if time.time_ns() - mtime_ns > RACY_NS else None
        return scan

    def _has_config(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.root, name, CONFIG_FILE))

    def read_meta(self, name: str) -> AdapterMeta:
        """The adapter's loraplex.json; defaults (added when its folder was) for a folder without a valid one."""
        folder = self.path(name)
        try:
            with (folder / META_FILE).open("rb") as f:
                raw = parse_json_object(f.read(MAX_META_BYTES))
            meta = AdapterMeta(**raw)
            if meta.mode not in MODES or type(meta.pinned) is not bool or type(meta.created_at) is not int:
                raise ValueError("mode, pinned or created_at has a bad value")
            return meta
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring %s of adapter %s: %s", META_FILE, name, exc)
        try:
            return AdapterMeta(created_at=int(folder.stat().st_mtime))
        except FileNotFoundError:
            raise NotFoundError(f"adapter {name!r} was removed", param="name") from None

    def write_meta(self, folder: Path, meta: AdapterMeta) -> None:
        """Replace the loraplex.json of an adapter folder (in the store or staged) atomically."""
        _write_atomic(folder / META_FILE, json.dumps(asdict(meta)).encode())

    def stage(self) -> Path:
        """A new, empty hidden folder inside the root to write an adapter into before `commit`."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{STAGING_PREFIX}{secrets.token_hex(TOKEN_CHARS // 2)}"
        path.mkdir()
        return path

    def commit(self, staged: Path, name: str, replace: bool) -> Path | None:
        """Rename a staged folder into place as `name`; returns the replaced folder, for the caller to `purge`.

        ConflictError when `name` exists and `replace` is false.
        """
        _fsync_tree(staged)
        dest = self.path(name)
        with self._lock:
            aside = None
            if dest.exists():
                if not replace:
                    raise ConflictError(f"adapter {name!r} already exists; send replace=true to overwrite it")
                aside = self.root / f"{ASIDE_PREFIX}{secrets.token_hex(TOKEN_CHARS // 2)}-{name}"
                os.rename(dest, aside)
            os.rename(staged, dest)
            _fsync_dir(self.root)
        return aside

    def detach(self, name: str) -> Path:
        """Take `name` out of the store atomically; returns its hidden folder, for the caller to `purge`."""
        source = self.path(name)
        with self._lock:
            if not (source / CONFIG_FILE).is_file():
                raise NotFoundError(f"adapter {name!r} is not in the store", param="name")
            hidden = self.root / f"{DELETED_PREFIX}{secrets.token_hex(TOKEN_CHARS // 2)}"
            os.rename(source, hidden)
            _fsync_dir(self.root)
        return hidden

    def purge(self, path: Path | None) -> None:
        """Delete a staged, replaced or detached folder (never a live adapter)."""
        if path is not None and path.parent == self.root and path.name.startswith("."):
            shutil.rmtree(path, ignore_errors=True)

    def recover(self) -> None:
        """Finish or undo the changes a crash interrupted; run before serving, with no writer on the store."""
        if not self.root.is_dir():
            return
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(ASIDE_PREFIX) and path.is_dir():
                self._recover_aside(path)
            elif path.name.startswith((STAGING_PREFIX, DELETED_PREFIX)) and path.is_dir():
                log.warning("removing %s, left by an interrupted store change", path.name)
                shutil.rmtree(path, ignore_errors=True)
        for folder in self.root.iterdir():
            for leftover in folder.glob(f".{META_FILE}.*") if folder.is_dir() else ():
                leftover.unlink(missing_ok=True)
        _fsync_dir(self.root)

    def _recover_aside(self, path: Path) -> None:
        name = path.name[len(ASIDE_PREFIX) + TOKEN_CHARS + 1 :]
        if NAME_PATTERN.fullmatch(name) and not (self.root / name).exists():
            log.warning("restoring adapter %s: its replacement was interrupted before the new folder was in", name)
            os.rename(path, self.root / name)
        else:
            shutil.rmtree(path, ignore_errors=True)


def now() -> int:
    return int(time.time())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(TOKEN_CHARS // 2)}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
