"""Adapter folders on the server's own disk that an admin may load by path (vLLM's `lora_path`), kept to one root.

Loading by path reads files of the server's machine on a client's word, so it is off unless the operator names a
root folder (`--lora-path-root`), and a path is followed (symlinks included) before it is checked to stay inside
it. Whether a path outside the root exists is never told. What is read is then checked and copied into the store
exactly as an upload is (`server.adapters.validation.stage_adapter`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import BinaryIO

from server.adapters.store import CONFIG_FILE
from server.adapters.weights import PICKLED_FILES, WEIGHTS_FILE
from server.errors import InvalidRequestError, PermissionDeniedError, UnsupportedMediaError

ROOT_FLAG = "--lora-path-root (LORAPLEX_LORA_PATH_ROOT)"


def adapter_files(root: Path | None, lora_path: str, param: str = "lora_path") -> tuple[Path, Path]:
    """The config and weights files of the PEFT folder `lora_path` (absolute, or relative to `root`), resolved.

    PermissionDeniedError without a root or for a folder or file outside it; InvalidRequestError for no folder or
    a missing file; UnsupportedMediaError for pickled weights (never read).
    """
    if root is None:
        raise PermissionDeniedError(
            f"loading adapters from a path on the server is off; start it with {ROOT_FLAG} set to the folder whose "
            "subfolders may be loaded",
            param=param,
        )
    base = root.resolve()
    try:
        return _files(base, lora_path, param)
    except OSError as exc:  # a name too long, no permission: nothing the server holds is at fault
        raise InvalidRequestError(f"{param}: {lora_path!r} cannot be read: {exc.strerror}", param=param) from exc


def _files(base: Path, lora_path: str, param: str) -> tuple[Path, Path]:
    folder = _inside(base, base / lora_path, lora_path, param)
    if not folder.is_dir():
        raise InvalidRequestError(f"{param}: {lora_path!r} is not a folder under {ROOT_FLAG}", param=param)
    config = _inside(base, folder / CONFIG_FILE, lora_path, param)
    if not config.is_file():
        raise InvalidRequestError(f"{param}: the folder {lora_path!r} holds no {CONFIG_FILE}", param=param)
    weights = _inside(base, folder / WEIGHTS_FILE, lora_path, param)
    if weights.is_file():
        return config, weights
    pickled = next((name for name in PICKLED_FILES if (folder / name).exists()), None)
    if pickled is not None:
        raise UnsupportedMediaError(
            f"{param}: the folder holds {pickled}, pickled weights, which are never loaded because loading them can "
            "run code; convert the adapter to safetensors (save_pretrained(..., safe_serialization=True))",
            param=param,
        )
    raise InvalidRequestError(f"{param}: the folder {lora_path!r} holds no {WEIGHTS_FILE}", param=param)


def _inside(base: Path, path: Path, lora_path: str, param: str) -> Path:
    """`path` with every symlink followed, if that stays inside `base`; PermissionDeniedError otherwise."""
    try:
        resolved = path.resolve()
    except (RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte
        raise InvalidRequestError(f"{param}: {lora_path!r} cannot be followed: {exc}", param=param) from exc
    if not resolved.is_relative_to(base):
        raise PermissionDeniedError(
            f"{param}: {lora_path!r} leads outside {ROOT_FLAG}; only folders under it can be loaded", param=param
        )
    return resolved


@contextmanager
def opened(files: tuple[Path, Path], param: str = "lora_path") -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """The config and weights files open for reading; InvalidRequestError if the server may not read them (or one
    went away since it was looked at)."""
    with ExitStack() as stack:
        try:
            config, weights = (stack.enter_context(path.open("rb")) for path in files)
        except OSError as exc:
            raise InvalidRequestError(f"{param}: {exc.filename} cannot be read: {exc.strerror}", param=param) from exc
        yield config, weights
