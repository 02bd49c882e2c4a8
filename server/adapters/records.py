"""What an adapter folder is, read from its files without the base model: the record the admin API shows.

Reading the safetensors header is also the format check uploads get first: a zip archive (`torch.save`) or a pickle
is named as such and refused before anything parses it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.adapters.config import check_config_sizes, read_config_file, show
from server.adapters.digests import file_digest
from server.adapters.safe_json import parse_json_object
from server.adapters.store import CONFIG_FILE
from server.adapters.weights import WEIGHTS_FILE
from server.errors import AdapterError, UnsupportedMediaError

# An adapter's header names 3 tensors per projection in ~150 bytes each: 8 MiB covers 50,000 of them. (safetensors
# itself allows 100 MiB, which Python's JSON parser would blow up to gigabytes of objects.)
MAX_HEADER_BYTES = 8 << 20
# safetensors' dtype names: what a record may show as its dtype.
SAFETENSORS_DTYPES = frozenset({"BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32",
                                "F32", "F64", "I64", "U64"})  # fmt: skip
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOLS = (2, 3, 4, 5)  # a pickle of protocol 2+ starts with PROTO (0x80) and the protocol number


@dataclass(frozen=True)
class AdapterRecord:
    """The facts of an adapter's files, as adapter_config.json and the safetensors header state them."""

    rank: int  # `r`
    alpha: float  # `lora_alpha`
    target_modules: tuple[str, ...] | str  # as configured: names, or a regex
    dora: bool
    dtype: str  # safetensors dtype of the tensors, e.g. "F32"; several are comma-separated
    size_bytes: int  # of adapter_model.safetensors
    sha256: str  # of adapter_model.safetensors


def describe_adapter_dir(path: Path) -> AdapterRecord:
    """The record of an adapter folder (hashes its weights); `AdapterError` when its files cannot be read."""
    raw = read_raw_config(path)
    header = read_safetensors_header(path / WEIGHTS_FILE)
    return make_record(raw, header, *file_digest(path / WEIGHTS_FILE))


def make_record(raw: Mapping[str, Any], header: Mapping[str, Any], size_bytes: int, sha256: str) -> AdapterRecord:
    """The record of a config and a safetensors header; every string in it is checked, so a response can show it."""
    check_config_sizes(raw)
    rank, alpha, targets = raw.get("r", 8), raw.get("lora_alpha", 8), raw.get("target_modules")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise AdapterError(f"r: must be an integer (got {show(rank)})", param="r")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise AdapterError(f"lora_alpha: must be a number (got {show(alpha)})", param="lora_alpha")
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        targets = tuple(targets)
    elif not isinstance(targets, str):
        raise AdapterError("target_modules: must be a list of names or a regex string", param="target_modules")
    dtypes = [v.get("dtype") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    unknown = next((d for d in dtypes if not (isinstance(d, str) and d in SAFETENSORS_DTYPES)), None)
    if unknown is not None:
        raise AdapterError(f"{WEIGHTS_FILE} has a tensor of unknown dtype {show(unknown)}", param=WEIGHTS_FILE)
    dora = raw.get("use_dora") is True
    return AdapterRecord(rank, float(alpha), targets, dora, ",".join(sorted(set(dtypes))), size_bytes, sha256)


def read_raw_config(path: Path) -> dict[str, Any]:
    """adapter_config.json of a folder as a dict (see `server.adapters.config.read_config_file`)."""
    return read_config_file(path / CONFIG_FILE)


def read_safetensors_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file; `UnsupportedMediaError` for pickles and zips, `AdapterError` else."""
    try:
        f = file.open("rb")
    except FileNotFoundError:
        raise AdapterError(f"{WEIGHTS_FILE} is missing", param=WEIGHTS_FILE) from None
    with f:
        head = f.read(8)
        size = os.fstat(f.fileno()).st_size
        _refuse_archives(head)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= length <= min(size - 8, MAX_HEADER_BYTES):
            raise AdapterError(
                f"{WEIGHTS_FILE} is not a safetensors file: its first 8 bytes do not give a header length that fits "
                f"the file ({size} bytes)",
                param=WEIGHTS_FILE,
            )
        data = f.read(length)
    try:
        return parse_json_object(data)
    except ValueError as e:
        raise AdapterError(
            f"{WEIGHTS_FILE} is not a safetensors file: its header is not a JSON object safetensors can hold ({e})",
            param=WEIGHTS_FILE,
        ) from None


def _refuse_archives(head: bytes) -> None:
    if head.startswith(ZIP_MAGIC):
        raise UnsupportedMediaError(
            f"{WEIGHTS_FILE} is a zip archive (torch.save's format), which can run code when loaded; only "
            "safetensors is accepted (save_pretrained(..., safe_serialization=True))",
            param=WEIGHTS_FILE,
        )
    if len(head) >= 2 and head[0] == 0x80 and head[1] in PICKLE_PROTOCOLS:
        raise UnsupportedMediaError(
            f"{WEIGHTS_FILE} is a Python pickle, which can run code when loaded; only safetensors is accepted",
            param=WEIGHTS_FILE,
        )
