"""Everything an adapter must pass before it is served: the one check behind uploads, `loraplex adapters verify`
and loading an adapter from disk."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from server.adapters.config import MAX_CONFIG_BYTES, MAX_TEXT_CHARS, check_config_sizes
from server.adapters.digests import Digest, file_digest
from server.adapters.patterns import check_config_patterns
from server.adapters.records import AdapterRecord, make_record, read_raw_config, read_safetensors_header
from server.adapters.store import CONFIG_FILE, AdapterStore
from server.adapters.weights import WEIGHTS_FILE, AdapterWeights, ModelInfo, all_finite, validate_adapter_dir
from server.errors import AdapterError, ConflictError, NotFoundError, PayloadTooLargeError

CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class StagedAdapter:
    """A checked adapter in a staging folder of the store, ready to commit under a name."""

    path: Path
    weights: AdapterWeights
    record: AdapterRecord


def check_adapter(
    path: Path, info: ModelInfo, max_lora_rank: int, digest: Digest = file_digest
) -> tuple[AdapterWeights, AdapterRecord]:
    """Check an adapter folder against the base model and load it: format, regexes, config, tensors.

    Raises `UnsupportedMediaError` for a pickle or zip, `AdapterError` naming the field or tensor for the rest.
    """
    raw = read_raw_config(path)
    file = path / WEIGHTS_FILE
    header = read_safetensors_header(file) if file.is_file() else {}  # without it, validate names what is wrong
    long_name = next((name for name in header if len(name) > MAX_TEXT_CHARS), None)
    if long_name is not None:  # errors name tensors: keep what they echo short
        raise AdapterError(f"{WEIGHTS_FILE} names a tensor with over {MAX_TEXT_CHARS} characters", param=WEIGHTS_FILE)
    check_config_sizes(raw)
    check_config_patterns(raw, info.num_layers, info.modules)
    weights = validate_adapter_dir(path, info, max_lora_rank, digest)
    check_finite(weights, info)
    return weights, make_record(raw, header, weights.size_bytes, weights.sha256)


def check_finite(weights: AdapterWeights, info: ModelInfo) -> None:
    """Refuse updates that overflow once scaled and cast: s·B, or DoRA's factor g, must be finite as served."""
    for (layer, proj), update in weights.updates.items():
        base = info.tensor_prefix(layer, proj)
        if not all_finite(update.b):
            scale = weights.config.targets[(layer, proj)].scale
            raise AdapterError(
                f"tensor {base}.lora_B.weight times the scale {scale:g} (lora_alpha / r) is not finite in "
                f"{update.b.dtype}; lower lora_alpha or the weights",
                param=f"{base}.lora_B.weight",
            )
        if update.g is not None and not all_finite(update.g):
            raise AdapterError(
                f"tensor {base}.lora_magnitude_vector gives a DoRA factor that is not finite in {update.g.dtype}",
                param=f"{base}.lora_magnitude_vector",
            )


def stage_adapter(
    store: AdapterStore, config: BinaryIO, weights: BinaryIO, max_adapter_bytes: int, info: ModelInfo, max_rank: int
) -> StagedAdapter:
    """Copy an adapter's two files into a new staging folder of `store`, in chunks, and check them there.

    Files over the limits get `PayloadTooLargeError`; the rest as `check_adapter`. The caller commits or purges it.
    """
    staged = store.stage()
    try:
        _copy(config, staged / CONFIG_FILE, MAX_CONFIG_BYTES, "config")
        _copy(weights, staged / WEIGHTS_FILE, max_adapter_bytes, "weights")
        return StagedAdapter(staged, *check_adapter(staged, info, max_rank))
    except BaseException:
        store.purge(staged)
        raise


def _copy(source: BinaryIO, dest: Path, limit: int, field: str) -> None:
    size = 0
    with dest.open("wb") as out:
        while chunk := source.read(CHUNK_BYTES):
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(f"{field}: the file is over the limit of {limit} bytes", param=field)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


def load_from_store(
    store: AdapterStore, name: str, info: ModelInfo, max_lora_rank: int, digest: Digest = file_digest
) -> tuple[AdapterWeights, AdapterRecord]:
    """`check_adapter` on the folder of `name`, again if it was replaced meanwhile, so config and weights match."""
    for _ in range(3):
        before = _folder_id(store, name)
        try:
            result = check_adapter(store.path(name), info, max_lora_rank, digest)
        except AdapterError:
            if _folder_id(store, name) != before:
                continue
            raise
        if _folder_id(store, name) == before:
            return result
    raise ConflictError(f"adapter {name!r} kept changing while it loaded; retry", param="model")


def _folder_id(store: AdapterStore, name: str) -> int:
    try:
        return store.path(name).stat().st_ino
    except FileNotFoundError:
        raise NotFoundError(f"adapter {name!r} was removed", param="model") from None
