"""The API keys file: a TOML (`.toml`) or JSON (`.json`) list of tenants, read strictly and written atomically.

    [[tenants]]
    name = "acme"                                   # 1-64 letters, digits, '.', '_', '-'; a metric label value
    keys = ["sha256:9f86d081884c7d65..."]           # SHA-256 hashes of its keys, never the keys
    adapters = ["acme-*", "shared-summarizer"]      # exact names and fnmatch globs (see server.tenants.scope)
    base_model = false                              # may it use the base model (default false)
    requests_per_minute = 600                       # optional limits, each a positive integer
    tokens_per_minute = 100000                      # generated tokens
    concurrent_requests = 8

Unknown fields, duplicate tenant names and a key hash listed twice are errors: a typo must not silently widen or
drop a scope. `loraplex keys` rewrites the file (comments are not kept); the server only reads it.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError

from server.errors import KeyFileError
from server.tenants.keys import check_hash
from server.tenants.scope import check_glob

if sys.version_info >= (3, 11):
    import tomllib
else:  # the CUDA image's Ubuntu 22.04 has Python 3.10
    import tomli as tomllib

TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RESERVED_NAMES = ("other",)  # the metric label of tenants beyond the label cap
FORMATS = (".toml", ".json")
LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "concurrent_requests")

KeyHash = Annotated[str, AfterValidator(check_hash)]
Glob = Annotated[str, AfterValidator(check_glob)]
Limit = Annotated[int | None, Field(None, gt=0)]


class TenantEntry(BaseModel):
    """One tenant as the file states it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    keys: list[KeyHash] = Field(default_factory=list)
    adapters: list[Glob] = Field(default_factory=list)
    base_model: bool = False
    requests_per_minute: Limit = None
    tokens_per_minute: Limit = None
    concurrent_requests: Limit = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not TENANT_NAME.match(name):
            raise ValueError("use 1-64 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit")
        if name in RESERVED_NAMES:
            raise ValueError(f"{name!r} is reserved")
        return name


class KeyFile(BaseModel):
    """The whole file."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tenants: list[TenantEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unambiguous(self) -> KeyFile:
        owners: dict[str, str] = {}
        names: set[str] = set()
        for tenant in self.tenants:
            if tenant.name in names:
                raise ValueError(f"tenant {tenant.name!r} is listed twice")
            names.add(tenant.name)
            for key in tenant.keys:
                if key in owners:
                    raise ValueError(f"one key hash is listed for both {owners[key]!r} and {tenant.name!r}")
                owners[key] = tenant.name
        return self

    def find(self, name: str) -> TenantEntry | None:
        return next((tenant for tenant in self.tenants if tenant.name == name), None)


def read_key_file(path: Path) -> KeyFile:
    """Parse and check the file; KeyFileError naming the file and the first problem (never a key)."""
    suffix = _format(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"API keys file {path}: cannot read it: {exc}") from exc
    try:
        raw = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise KeyFileError(f"API keys file {path}: not valid {suffix[1:].upper()}: {exc}") from exc
    return validate_key_file(raw, path)


def validate_key_file(raw: object, path: Path) -> KeyFile:
    """Check parsed content; KeyFileError naming the file, the first offending field and what is wrong."""
    if not isinstance(raw, dict):
        raise KeyFileError(f"API keys file {path}: the top level must be an object holding a 'tenants' list")
    try:
        return KeyFile.model_validate(raw)
    except PydanticValidationError as exc:
        first = exc.errors(include_input=False)[0]
        where = _location(first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        raise KeyFileError(f"API keys file {path}: {where}{': ' if where else ''}{message}") from None


def write_key_file(path: Path, keys: KeyFile) -> None:
    """Replace the file atomically (temp file, fsync, rename), readable by its owner only."""
    suffix = _format(path)
    text = to_toml(keys) if suffix == ".toml" else keys.model_dump_json(indent=2, exclude_none=True) + "\n"
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def to_toml(keys: KeyFile) -> str:
    """The file as TOML. Every value is a bool, an int, or a string (or list of strings) of printable ASCII without
    quotes or backslashes, which JSON and TOML spell the same way."""
    blocks = [
        "\n".join(["[[tenants]]", *(f"{k} = {json.dumps(v)}" for k, v in tenant.model_dump(exclude_none=True).items())])
        for tenant in keys.tenants
    ]
    return "\n\n".join(blocks) + "\n" if blocks else "tenants = []\n"


def _format(path: Path) -> str:
    if path.suffix not in FORMATS:
        raise KeyFileError(f"API keys file {path}: name it *.toml or *.json, so its format is known")
    return path.suffix


def _location(loc: tuple[str | int, ...]) -> str:
    """`("tenants", 0, "keys", 1)` -> `tenants[0].keys[1]`."""
    where = ""
    for part in loc:
        where += f"[{part}]" if isinstance(part, int) else f".{part}" if where else str(part)
    return where
