"""Tenant API keys on the /v1 routes: who calls (401), what they may see (404 outside their scope) and admission
within their limits (429), before any work is queued. Without a key file all of this is off and /v1 stays open.

`guard` returns the dependencies that `create_app` puts on the /v1 router only when a key file is configured, so
the OpenAPI document declares the bearer scheme exactly when the server enforces it. The route dependencies below
then read the caller's account from the request, and refuse to serve if it is missing (never fail open).
"""

# No `from __future__ import annotations`: FastAPI must see these dependencies' parameter annotations as objects,
# because their return type, AsyncEngine, exists only for type checkers and would make it give up on strings.
import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from server.api.deps import EngineDep
from server.api.openapi import error_responses
from server.errors import (
    AuthenticationError,
    ConflictError,
    KeyFileError,
    LoraplexError,
    NotFoundError,
    QueueFullError,
)
from server.metrics import Metrics
from server.settings import Settings
from server.tenants.directory import Account, TenantDirectory
from server.tenants.engine_view import TenantEngine
from server.tenants.quota import Clock

if TYPE_CHECKING:
    from server.engine.async_engine import AsyncEngine

log = logging.getLogger(__name__)

# Refusals counted per tenant here (401 has no tenant and is counted where it is raised). Their statuses are those of
# server.api.errors' table, named here because a metric label is a string.
REFUSALS: tuple[tuple[type[LoraplexError], str], ...] = ((NotFoundError, "404"), (QueueFullError, "429"))
tenant_bearer = HTTPBearer(
    auto_error=False, scheme_name="TenantKey", description="A tenant API key from the server's --api-keys file"
)


class KeysReloaded(BaseModel):
    """What the key file holds after a reload."""

    tenants: int
    keys: int


def load_tenants(settings: Settings, clock: Clock = time.monotonic) -> TenantDirectory | None:
    """The tenants of `--api-keys`, or None without one; KeyFileError if the file is invalid."""
    if settings.api_keys_file is None:
        return None
    admin_token = settings.admin_token.get_secret_value() if settings.admin_token is not None else None
    return TenantDirectory(settings.api_keys_file, admin_token=admin_token, clock=clock)


def guard(tenants: TenantDirectory | None) -> dict[str, Any]:
    """`include_router` arguments for the routes behind tenant keys: authentication (and its 401 in the OpenAPI
    document) when there are tenants, nothing otherwise."""
    if tenants is None:
        return {}
    return {"dependencies": [Security(authenticate)], "responses": error_responses(AuthenticationError)}


async def authenticate(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(tenant_bearer)]
) -> AsyncIterator[None]:
    """Resolve the bearer key to its account (401 if none) and count the request's 404/429 refusals by tenant."""
    tenants: TenantDirectory = request.app.state.tenants
    metrics: Metrics = request.app.state.metrics
    account = tenants.authenticate("" if credentials is None else credentials.credentials)
    if account is None:
        metrics.record_tenant_refusal(None, "401")
        raise AuthenticationError("missing or unknown API key; send the header 'Authorization: Bearer <key>'")
    request.state.account = account
    try:
        yield
    except LoraplexError as exc:
        status = next((status for kind, status in REFUSALS if isinstance(exc, kind)), None)
        if status is not None:
            metrics.record_tenant_refusal(account.tenant.name, status)
        raise


def current_account(request: Request) -> Account | None:
    """The caller's account; None when the server has no key file."""
    if request.app.state.tenants is None:
        return None
    account: Account | None = getattr(request.state, "account", None)
    if account is None:  # a /v1 route mounted without `guard`: a bug, and it must not serve anyone
        raise LoraplexError(f"{request.url.path} is not behind tenant authentication")
    return account


def scoped_engine(request: Request, engine: EngineDep) -> "AsyncEngine":
    """The engine as the caller may see it: only the models in its tenant's scope exist."""
    account = current_account(request)
    return engine if account is None else TenantEngine(engine, account.tenant.scope)


async def admitted_engine(request: Request, engine: EngineDep) -> AsyncIterator["AsyncEngine"]:
    """The scoped engine for a generation request admitted within its tenant's limits (429 otherwise).

    Runs once the engine is ready (503 first) and before the body is used, so a refused request queues nothing;
    its place in the concurrency limit is held until the response, streamed or not, has been sent.
    """
    account = current_account(request)
    if account is None:
        yield engine
        return
    metrics: Metrics = request.app.state.metrics
    name = account.tenant.name
    lease = account.admit()
    metrics.record_tenant_request(name)

    def count(tokens: int) -> None:
        account.quota.record_tokens(tokens)
        metrics.record_tenant_tokens(name, tokens)

    try:
        yield TenantEngine(engine, account.tenant.scope, count)
    finally:
        lease.release()


ScopedEngineDep = Annotated["AsyncEngine", Depends(scoped_engine)]
AdmittedEngineDep = Annotated["AsyncEngine", Depends(admitted_engine)]


def reload_keys(request: Request) -> KeysReloaded:
    """Re-read the key file (KeyFileError, and the old keys stay, if it is invalid); 409 without one."""
    tenants: TenantDirectory | None = request.app.state.tenants
    if tenants is None:
        raise ConflictError("the server was started without --api-keys (LORAPLEX_API_KEYS_FILE): no keys to reload")
    tenants.reload()
    return KeysReloaded(tenants=len(tenants.tenants), keys=tenants.num_keys)


def install_sighup_reload(tenants: TenantDirectory | None) -> Callable[[], None]:
    """Re-read the key file on SIGHUP (when there is one); returns what uninstalls the handler."""
    if tenants is None or not hasattr(signal, "SIGHUP"):
        return lambda: None
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, reload_logged, tenants)
    except (RuntimeError, ValueError):  # not the main thread's loop: POST /admin/keys/reload still works
        log.warning("API keys: SIGHUP cannot be handled here; reload them with POST /admin/keys/reload")
        return lambda: None
    return lambda: loop.remove_signal_handler(signal.SIGHUP)


def reload_logged(tenants: TenantDirectory) -> None:
    """Re-read the key file; an invalid one is logged and the previous keys stay (what SIGHUP does)."""
    # The file is small: reading it on the event loop costs less than a hop to a thread.
    try:
        tenants.reload()
    except KeyFileError as exc:
        log.error("API keys not reloaded, the previous ones stay in force: %s", exc.message)
