"""The admin routes under /admin: add, replace, inspect, change and remove adapters on a running server.

Every route needs the admin bearer token. Uploads are parsed here (not by FastAPI) so that the token is checked
before the body is read; python-multipart spools the files to disk, and the engine's adapter registry stages, checks
and commits them in a worker thread. At most `--max-concurrent-uploads` uploads run at once; more get 429 before
their body is read.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server import errors
from server.adapters.config import MAX_CONFIG_BYTES
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
from server.api.openapi import ENGINE_ERRORS, JSON_BODY_ERRORS, error_responses
from server.api.routing import BoundedRoute
from server.api.tenancy import KeysReloaded, reload_keys
from server.settings import Settings

UPLOAD_PATH = "/admin/adapters"
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries, part headers and the small fields

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)], route_class=BoundedRoute)
# Every admin route checks the token first and needs the engine's registry.
ADMIN_ERRORS = (errors.AuthenticationError, errors.PermissionDeniedError, *ENGINE_ERRORS)


def upload_limit(settings: Settings) -> int:
    """The most bytes an upload's body may have: both files at their limits plus the form around them."""
    return settings.max_adapter_bytes + MAX_CONFIG_BYTES + FORM_OVERHEAD_BYTES


@router.post(
    "/adapters",
    status_code=201,
    response_model=AdapterObject,
    openapi_extra=UPLOAD_OPENAPI,
    responses=error_responses(
        *ADMIN_ERRORS,
        *JSON_BODY_ERRORS,
        errors.ConflictError,
        errors.UnsupportedMediaError,
        errors.ValidationError,
        errors.QueueFullError,
    ),
)
async def upload_adapter(request: Request, engine: EngineDep) -> AdapterObject:
    with engine.upload_slot():  # before the body is read: a busy server does not spool what it will refuse
        form = await request.form(max_files=2, max_fields=8)
        try:
            upload = AdapterUpload.from_form(form)
            view = await engine.add_adapter(
                upload.name, upload.config.file, upload.weights.file, replace=upload.replace, mode=upload.mode,
                pinned=upload.pinned,
            )  # fmt: skip
        finally:
            await form.close()
    return AdapterObject.from_view(view)


@router.get("/adapters", responses=error_responses(*ADMIN_ERRORS))
def list_adapters(engine: EngineDep) -> AdapterList:
    return AdapterList(data=[AdapterObject.from_view(view) for view in engine.adapter_views()])


@router.get("/adapters/{name}", responses=error_responses(*ADMIN_ERRORS, errors.NotFoundError))
def get_adapter(name: str, engine: EngineDep) -> AdapterObject:
    return AdapterObject.from_view(engine.adapter_view(name))


@router.patch(
    "/adapters/{name}",
    responses=error_responses(*ADMIN_ERRORS, *JSON_BODY_ERRORS, errors.NotFoundError, errors.ConflictError),
)
def update_adapter(name: str, body: AdapterPatch, engine: EngineDep) -> AdapterObject:
    return AdapterObject.from_view(engine.update_adapter(name, body.mode, body.pinned))


@router.delete("/adapters/{name}", responses=error_responses(*ADMIN_ERRORS, errors.NotFoundError))
def delete_adapter(name: str, engine: EngineDep) -> AdapterDeleted:
    engine.remove_adapter(name)
    return AdapterDeleted(name=name)


@router.post(
    "/keys/reload",
    responses=error_responses(errors.AuthenticationError, errors.PermissionDeniedError, errors.ConflictError,
                              errors.KeyFileError),
)  # fmt: skip
def reload_api_keys(request: Request) -> KeysReloaded:
    """Re-read the API keys file; running requests carry on, an invalid file keeps the old keys (422 says why)."""
    return reload_keys(request)
