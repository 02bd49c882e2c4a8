"""The engine as the routes see it: built in the background, handed out only once it is ready."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from server.errors import ServiceUnavailableError
from server.metrics import Metrics
from server.settings import Settings

if TYPE_CHECKING:
    from server.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)

EngineFactory = Callable[[Settings, Metrics], "AsyncEngine"]  # the engine records into the app's Metrics


class EngineState:
    """Holds the engine once its factory returns, or the reason the factory failed."""

    def __init__(self) -> None:
        self.engine: AsyncEngine | None = None
        self.failure: str | None = None

    async def build(self, factory: EngineFactory, settings: Settings, metrics: Metrics) -> None:
        """Run the (blocking) factory in a worker thread, so the server answers /health meanwhile."""
        try:
            self.engine = await asyncio.to_thread(factory, settings, metrics)
        except Exception as exc:
            logger.exception("engine failed to start")
            self.failure = f"engine failed to start: {exc}"
            return
        logger.info("engine ready: serving %s", self.engine.served_model_name)

    def require(self) -> AsyncEngine:
        """The engine, or ServiceUnavailableError while it loads or after it failed."""
        if self.failure is not None:
            raise ServiceUnavailableError(self.failure)
        if self.engine is None:
            raise ServiceUnavailableError("model is loading")
        if not self.engine.is_ready():
            raise ServiceUnavailableError(self.engine.health_problem() or "the engine has stopped")
        return self.engine

    async def shutdown(self) -> None:
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)


async def get_engine(request: Request) -> AsyncEngine:
    state: EngineState = request.app.state.engine_state
    return state.require()


EngineDep = Annotated["AsyncEngine", Depends(get_engine)]
