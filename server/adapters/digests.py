"""SHA-256 digests of adapter weight files, each file version hashed once.

Every load from the store hashes `adapter_model.safetensors` for the record the admin API shows, and under churn
(a host tier smaller than the store) the same adapter is loaded again and again: hashing was a fifth of a rank-64
load on the default model (10 of 44 ms on one thread, docs/BENCHMARKS.md), paid on the core the engine shares.
`FileDigests` remembers a digest under the file's identity: device, inode, size, and modification and change
times. Any write moves both times (since Linux 6.13's multigrain timestamps even within one clock tick of the last
look), and the change time cannot be set from user space, so an entry only answers for the bytes it hashed; a file
rewritten while it was hashed is not remembered.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

CHUNK_BYTES = 1 << 20
MAX_ENTRIES = 1 << 16  # one per file version; ~200 bytes each: at most ~13 MiB, for stores of tens of thousands


def file_digest(file: Path) -> tuple[int, str]:
    """Size and hex SHA-256 of `file`, read in chunks."""
    sha = hashlib.sha256()
    size = 0
    with file.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


Digest = Callable[[Path], tuple[int, str]]  # weights file -> (size, hex SHA-256): `file_digest` or a `FileDigests`
FileId = tuple[int, int, int, int, int]  # device, inode, size, modification and change times (ns)


class FileDigests:
    """`file_digest`, remembered per file version (see the module); least recently used forgotten first."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[FileId, tuple[int, str]] = OrderedDict()
        self._lock = threading.Lock()  # loads run on several worker threads

    def __call__(self, file: Path) -> tuple[int, str]:
        before = _file_id(file)
        with self._lock:
            known = self._entries.get(before)
            if known is not None:
                self._entries.move_to_end(before)
                return known
        result = file_digest(file)
        if _file_id(file) == before:
            with self._lock:
                self._entries[before] = result
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return result

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def _file_id(file: Path) -> FileId:
    st = os.stat(file)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
