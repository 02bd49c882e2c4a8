"""`GET /health`: 200 once the engine is ready, 503 with the reason until then."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.deps import EngineDep
from server.api.responses import Health

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(engine: EngineDep) -> Health:
    return Health()
