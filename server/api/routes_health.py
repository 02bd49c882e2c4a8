"""`GET /health`: 200 while the engine serves; 503 with the reason while it loads, or once it has stopped, keeps
failing its steps or stalls with work to do."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.api.deps import EngineState
from server.api.responses import Health
from server.errors import ServiceUnavailableError

router = APIRouter(tags=["health"])


@router.get("/health", responses={503: {"description": "The engine is loading, stopped, failing or stalled"}})
async def health(request: Request) -> Health:
    state: EngineState = request.app.state.engine_state
    engine = state.engine
    problem = engine.health_problem() if engine is not None and state.failure is None else None
    if problem is not None:
        raise ServiceUnavailableError(problem)
    state.require()
    return Health()
