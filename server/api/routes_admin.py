"""The admin routes under /admin: add, replace, inspect, change and remove adapters on a running server.

Every route needs the admin bearer token. Uploads are parsed here (not by FastAPI) so that the token is checked
before the body is read; python-multipart spools the files to disk, and the registry stages, checks and commits them
in a worker thread.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from server.adapters.records import MAX_CONFIG_BYTES
from server.adapters.registry import AdapterRegistry
from server.api.admin_schemas import (
    UPLOAD_OPENAPI,
    AdapterDeleted,
    AdapterList,
    AdapterObject,
    AdapterPatch,
    AdapterUpload,
)
from server.api.auth import require_admin
from server.api.deps import EngineDep
from server.api.tenancy import KeysReloaded, reload_keys
from server.settings import Settings
from server.threads import single_threaded

UPLOAD_PATH = "/admin/adapters"
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries, part headers and the small fields

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


def upload_limit(settings: Settings) -> int:
    """The most bytes an upload's body may have: both files at their limits plus the form around them."""
    return settings.max_adapter_bytes + MAX_CONFIG_BYTES + FORM_OVERHEAD_BYTES


def get_registry(engine: EngineDep) -> AdapterRegistry:
    return engine.adapters


RegistryDep = Annotated[AdapterRegistry, Depends(get_registry)]


@router.post("/adapters", status_code=201, response_model=AdapterObject, openapi_extra=UPLOAD_OPENAPI)
async def upload_adapter(request: Request, registry: RegistryDep) -> AdapterObject:
    settings: Settings = request.app.state.settings
    form = await request.form(max_files=2, max_fields=8)
    try:
        upload = AdapterUpload.from_form(form)
        view = await asyncio.to_thread(
            single_threaded, registry.add, upload.name, upload.config.file, upload.weights.file, replace=upload.replace,
            mode=upload.mode, pinned=upload.pinned, max_adapter_bytes=settings.max_adapter_bytes,
        )  # fmt: skip
    finally:
        await form.close()
    return AdapterObject.from_view(view)


@router.get("/adapters")
def list_adapters(registry: RegistryDep) -> AdapterList:
    return AdapterList(data=[AdapterObject.from_view(view) for view in registry.views()])


@router.get("/adapters/{name}")
def get_adapter(name: str, registry: RegistryDep) -> AdapterObject:
    return AdapterObject.from_view(registry.view(name))


@router.patch("/adapters/{name}")
def update_adapter(name: str, body: AdapterPatch, registry: RegistryDep) -> AdapterObject:
    return AdapterObject.from_view(registry.update(name, body.mode, body.pinned))


@router.delete("/adapters/{name}")
def delete_adapter(name: str, registry: RegistryDep) -> AdapterDeleted:
    registry.remove(name)
    return AdapterDeleted(name=name)


@router.post("/keys/reload")
def reload_api_keys(request: Request) -> KeysReloaded:
    """Re-read the API keys file; running requests carry on, an invalid file keeps the old keys (422 says why)."""
    return reload_keys(request)
