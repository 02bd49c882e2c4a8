"""The FastAPI application: lifespan, middleware, error handlers and routers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import server
from server.api import (
    routes_admin,
    routes_health,
    routes_metrics,
    routes_openai,
    routes_tokenize,
    routes_vllm_lora,
    tenancy,
)
from server.api.body_limit import BodyLimitMiddleware
from server.api.deps import EngineFactory, EngineState
from server.api.errors import install_error_handlers
from server.api.openapi import install_openapi
from server.metrics import Metrics
from server.settings import Settings
from server.tenants.quota import Clock


def create_app(settings: Settings, engine_factory: EngineFactory, *, clock: Clock = time.monotonic) -> FastAPI:
    """Build the app and its metrics; its lifespan builds the engine in the background and shuts it down at exit.

    `clock` times the tenants' quota windows. An invalid API keys file raises KeyFileError here.
    """
    state = EngineState()
    metrics = Metrics(settings.metrics_max_adapters, settings.max_loras, settings.metrics_max_tenants)
    tenants = tenancy.load_tenants(settings, clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        build = asyncio.create_task(state.build(engine_factory, settings, metrics))
        uninstall_sighup = tenancy.install_sighup_reload(tenants)
        try:
            yield
        finally:
            uninstall_sighup()
            # A half-built engine cannot be abandoned safely: wait for the build, then shut it down.
            await build
            await state.shutdown()

    app = FastAPI(title="loraplex", version=server.__version__, lifespan=lifespan)
    app.state.engine_state = state
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.tenants = tenants
    uploads = {routes_admin.UPLOAD_PATH: routes_admin.upload_limit(settings)}
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes, streamed=uploads)
    install_error_handlers(app)
    install_openapi(app, settings)
    app.include_router(routes_health.router)
    app.include_router(routes_openai.router, **tenancy.guard(tenants))
    app.include_router(routes_tokenize.router, **tenancy.guard(tenants))
    app.include_router(routes_metrics.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_vllm_lora.router)
    return app
