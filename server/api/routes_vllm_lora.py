"""vLLM's adapter routes, `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter`, over the admin store.

Clients written for vLLM's runtime LoRA updating work unchanged: the same bodies, and the same plain-text answers
on success. Both routes need the admin token, as /admin does. Loading reads a PEFT folder on the server's disk
(under `--lora-path-root`, `server.adapters.local_folders`) and adds it as an upload does (`POST /admin/adapters`):
the same checks, the same atomic copy into the store; unloading removes it as `DELETE /admin/adapters/{name}` does.
A name that is already served is a 409 (vLLM answers 400), an unknown one on unload a 404, as in vLLM.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from server import errors
from server.adapters.local_folders import adapter_files
from server.api.admin_schemas import LoadLoraAdapter, UnloadLoraAdapter
from server.api.auth import require_admin
from server.api.deps import EngineDep
from server.api.openapi import ENGINE_ERRORS, JSON_BODY_ERRORS, error_responses
from server.api.routing import BoundedRoute

if TYPE_CHECKING:
    from server.engine.async_engine import AsyncEngine

router = APIRouter(prefix="/v1", tags=["admin"], dependencies=[Depends(require_admin)], route_class=BoundedRoute)
ADMIN_ERRORS = (errors.AuthenticationError, errors.PermissionDeniedError, *ENGINE_ERRORS, *JSON_BODY_ERRORS)
SUCCESS = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "what vLLM answers"}}


@router.post(
    "/load_lora_adapter",
    response_class=PlainTextResponse,
    responses={**SUCCESS, **error_responses(*ADMIN_ERRORS, errors.ConflictError, errors.UnsupportedMediaError,
                                            errors.ValidationError, errors.QueueFullError)},
)  # fmt: skip
async def load_lora_adapter(body: LoadLoraAdapter, request: Request, engine: EngineDep) -> str:
    """Serve the adapter folder `lora_path` (under the server's --lora-path-root) as `lora_name`."""
    with _named("lora_name"):
        _refuse_served(engine, body.lora_name)
        config, weights = await run_in_threadpool(adapter_files, request.app.state.settings.lora_path_root,
                                                  body.lora_path)  # fmt: skip
        with engine.upload_slot(), ExitStack() as files:
            await engine.add_adapter(
                body.lora_name, files.enter_context(config.open("rb")), files.enter_context(weights.open("rb")),
                replace=False, mode=None, pinned=None,
            )  # fmt: skip
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post(
    "/unload_lora_adapter",
    response_class=PlainTextResponse,
    responses={**SUCCESS, **error_responses(*ADMIN_ERRORS, errors.NotFoundError)},
)
def unload_lora_adapter(body: UnloadLoraAdapter, engine: EngineDep) -> str:
    """Stop serving `lora_name` and remove it from the store; its running requests finish."""
    with _named("lora_name"):
        engine.remove_adapter(body.lora_name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."


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
