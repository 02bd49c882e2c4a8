"""Run a planned load against a server: send each request at its time, at most `max_concurrency` at once."""

from __future__ import annotations

import asyncio
import time

import httpx

from load_tests.client import RequestResult, send
from load_tests.workload import PlannedRequest


async def list_models(url: str) -> list[str]:
    """Every model id the server lists at /v1/models (the base model and its adapters)."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        response = await client.get("/v1/models")
        response.raise_for_status()
        return [model["id"] for model in response.json()["data"]]


async def run(
    url: str, requests: list[PlannedRequest], max_concurrency: int | None, timeout_s: float
) -> tuple[list[RequestResult], float]:
    """Send every request; returns one result per request, in plan order, and the run's duration in seconds."""
    slots = asyncio.Semaphore(max_concurrency or len(requests))
    limits = httpx.Limits(max_connections=max_concurrency or len(requests), max_keepalive_connections=None)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        start = time.perf_counter()

        async def launch(request: PlannedRequest) -> RequestResult:
            await asyncio.sleep(max(0.0, request.send_at - (time.perf_counter() - start)))
            async with slots:
                return await send(client, request, start, timeout_s)

        outcomes = await asyncio.gather(*(launch(r) for r in requests), return_exceptions=True)
        duration = time.perf_counter() - start
    return [_accounted(r, o) for r, o in zip(requests, outcomes, strict=True)], duration


def _accounted(request: PlannedRequest, outcome: RequestResult | BaseException) -> RequestResult:
    """A request whose task died without a result is a failure, never a gap in the report."""
    if isinstance(outcome, RequestResult):
        return outcome
    error = f"lost: {type(outcome).__name__}: {outcome}"
    return RequestResult(request.index, request.model, len(request.prompt), request.send_at, error=error)
