"""Request and response bodies of the admin routes under /admin."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

import pydantic
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import FormData, UploadFile

from server.adapters.store import MODES, NAME_PATTERN, Mode
from server.adapters.versions import AdapterView, Tier


class AdapterUpload(BaseModel):
    """The multipart form of `POST /admin/adapters`."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str
    config: UploadFile  # adapter_config.json
    weights: UploadFile  # adapter_model.safetensors
    replace: bool = False
    mode: Mode | None = None  # default: unchanged by a replacement, else "unmerged"
    pinned: bool | None = None  # default: unchanged by a replacement, else false

    @classmethod
    def from_form(cls, form: FormData) -> AdapterUpload:
        """Validate a parsed form; errors become the API's usual 400 naming the field."""
        try:
            return cls.model_validate(dict(form))
        except pydantic.ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None


UPLOAD_OPENAPI: dict[str, Any] = {  # FastAPI cannot describe a form the route parses itself
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "config", "weights"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "pattern": f"^{NAME_PATTERN.pattern}$"},
                        "config": {"type": "string", "format": "binary", "description": "adapter_config.json"},
                        "weights": {"type": "string", "format": "binary", "description": "adapter_model.safetensors"},
                        "replace": {"type": "boolean", "default": False},
                        "mode": {"type": "string", "enum": list(MODES)},
                        "pinned": {"type": "boolean"},
                    },
                }
            }
        },
    }
}


class AdapterPatch(BaseModel):
    """`PATCH /admin/adapters/{name}`: the settings to change; omitted ones stay."""

    model_config = ConfigDict(extra="forbid", strict=True)

    mode: Mode | None = None
    pinned: bool | None = None


class AdapterObject(BaseModel):
    """An adapter: its record (null where a broken folder cannot be read), settings and live state."""

    name: str
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str] | str | None = None  # as configured: names, or a regex
    dora: bool | None = None
    dtype: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    mode: Mode
    pinned: bool
    created_at: int
    tier: Tier  # where the current version is: disk, host memory or a device slot
    running: int  # requests in the running batch
    waiting: int  # requests queued or loading the adapter
    requests_served: int
    last_used_at: int | None
    error: str | None = None  # why the adapter's files cannot be read

    @classmethod
    def from_view(cls, view: AdapterView) -> AdapterObject:
        return cls(
            **(asdict(view.record) if view.record is not None else {}),
            name=view.name,
            mode=view.meta.mode,
            pinned=view.meta.pinned,
            created_at=view.meta.created_at,
            tier=view.tier,
            running=view.running,
            waiting=view.waiting,
            requests_served=view.served,
            last_used_at=None if view.last_used is None else int(view.last_used),
            error=view.error,
        )


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterObject]


class AdapterDeleted(BaseModel):
    name: str
    deleted: Literal[True] = True


class LoadLoraAdapter(BaseModel):
    """vLLM's `POST /v1/load_lora_adapter`: serve the PEFT folder `lora_path` (on the server) as `lora_name`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str = Field(pattern=f"^{NAME_PATTERN.pattern}$")
    lora_path: str = Field(min_length=1, max_length=4096, description="a folder under the server's --lora-path-root")


class UnloadLoraAdapter(BaseModel):
    """vLLM's `POST /v1/unload_lora_adapter`: stop serving `lora_name` and take it out of the store."""

    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str = Field(pattern=f"^{NAME_PATTERN.pattern}$")
    lora_int_id: int | None = Field(None, description="accepted and ignored, as vLLM's server does")
