"""vLLM's adapter routes, `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter`, over the admin store.

Clients written for vLLM's runtime LoRA updating work unchanged: the same bodies, and the same plain-text answers
on success. Both routes need the admin token, as /admin does. Loading reads a PEFT folder on the server's disk
(under `--lora-path-root`, `server.adapters.local_folders`) and adds it as an upload does (`POST /admin/adapters`):
the same checks, the same atomic copy into the store; unloading removes it as `DELETE /admin/adapters/{name}` does.
A name that is already served is a 409 (vLLM answers 400), an unknown one on unload a 404, as in vLLM.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from server import errors
from server.adapters.local_folders import adapter_files, opened
from server.api.admin_schemas import LoadLoraAdapter, UnloadLoraAdapter
from server.api.auth import require_admin
from server.api.deps import EngineDep
from server.api.openapi import ENGINE_ERRORS, JSON_BODY_ERRORS, error_responses
from server.api.routing import BoundedRoute

if TYPE_CHECKING:
    from server.engine.async_engine import AsyncEngine

router = APIRouter(prefix="/v1", tags=["admin"], dependencies=[Depends(require_admin)], route_class=BoundedRoute)
ADMIN_ERRORS = (errors.AuthenticationError, errors.PermissionDeniedError, *ENGINE_ERRORS, *JSON_BODY_ERRORS)
# vLLM answers plain text on success; errors stay JSON in the OpenAI shape. The routes' response class is the bare
# Response, which has no media type, so /openapi.json keeps the errors as JSON and the success as text only.
SUCCESS = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "what vLLM answers"}}


@router.post(
    "/load_lora_adapter",
    response_class=Response,
    responses={**SUCCESS, **error_responses(*ADMIN_ERRORS, errors.ConflictError, errors.UnsupportedMediaError,
                                            errors.ValidationError, errors.QueueFullError)},
)  # fmt: skip
async def load_lora_adapter(body: LoadLoraAdapter, request: Request, engine: EngineDep) -> PlainTextResponse:
    """Serve the adapter folder `lora_path` (under the server's --lora-path-root) as `lora_name`."""
    with _named("lora_name"):
        _refuse_served(engine, body.lora_name)
        files = await run_in_threadpool(adapter_files, request.app.state.settings.lora_path_root, body.lora_path)
        with engine.upload_slot(), opened(files) as (config, weights):
            await engine.add_adapter(body.lora_name, config, weights, replace=False, mode=None, pinned=None)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post(
    "/unload_lora_adapter",
    response_class=Response,
    responses={**SUCCESS, **error_responses(*ADMIN_ERRORS, errors.NotFoundError)},
)
def unload_lora_adapter(body: UnloadLoraAdapter, engine: EngineDep) -> PlainTextResponse:
    """Stop serving `lora_name` and remove it from the store; its running requests finish."""
    with _named("lora_name"):
        engine.remove_adapter(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def _refuse_served(engine: AsyncEngine, name: str) -> None:
    try:
        engine.resolve_adapter(name)
    except errors.NotFoundError:
        return
    raise errors.ConflictError(
        f"the model {name!r} is already served; unload it first (POST /v1/unload_lora_adapter), or replace it in "
        "place with POST /admin/adapters and replace=true",
        param="lora_name",
    )


@contextmanager
def _named(field: str) -> Iterator[None]:
    """The store's errors about an adapter's `name` name this route's field instead."""
    try:
        yield
    except errors.LoraplexError as exc:
        if exc.param == "name":
            exc.param = field
        raise
