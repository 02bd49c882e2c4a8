"""`GET /metrics`: every collector in the Prometheus text format, served whether or not the engine is up."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.metrics import CONTENT_TYPE, Metrics

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE)
