"""Lifecycle: the server answers at once, 503 until the engine is built, the reason if it fails, shutdown at exit."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from api_helpers import wait_until_healthy
from fake_engine import FakeEngine
from fastapi import FastAPI

from server.api import create_app
from server.metrics import Metrics
from server.settings import Settings

COMPLETION = {"model": "base-model", "prompt": "a"}
CHAT = {"model": "base-model", "messages": [{"role": "user", "content": "hi"}]}


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test")


def assert_unavailable(response: httpx.Response, message: str) -> None:
    assert response.status_code == 503
    assert response.json() == {
        "error": {"message": message, "type": "service_unavailable_error", "param": None, "code": None}
    }


async def test_healthy(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_503_while_the_engine_builds_then_ready() -> None:
    release = threading.Event()
    engine = FakeEngine()

    def slow_factory(settings: Settings, metrics: Metrics) -> FakeEngine:
        release.wait(timeout=10)
        return engine

    app = create_app(Settings(), slow_factory)
    async with app.router.lifespan_context(app), client_for(app) as client:
        assert_unavailable(await client.get("/health"), "model is loading")
        assert_unavailable(await client.post("/v1/completions", json=COMPLETION), "model is loading")
        assert_unavailable(await client.post("/v1/chat/completions", json=CHAT), "model is loading")
        assert_unavailable(await client.get("/v1/models"), "model is loading")
        release.set()
        await wait_until_healthy(client)
        assert (await client.post("/v1/completions", json=COMPLETION)).status_code == 200
    assert engine.shut_down


async def test_engine_that_is_built_but_not_ready(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.ready = False
    assert_unavailable(await client.get("/health"), "model is loading")


async def test_factory_failure_keeps_503_with_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    def broken_factory(settings: Settings, metrics: Metrics) -> FakeEngine:
        raise RuntimeError("no weights in /nowhere")

    app = create_app(Settings(), broken_factory)
    async with app.router.lifespan_context(app), client_for(app) as client:
        for _ in range(500):
            response = await client.get("/health")
            if response.json()["error"]["message"] != "model is loading":
                break
            await asyncio.sleep(0.01)
        reason = "engine failed to start: no weights in /nowhere"
        assert_unavailable(response, reason)
        assert_unavailable(await client.post("/v1/completions", json=COMPLETION), reason)
    assert "engine failed to start" in caplog.text


async def test_shutdown_stops_the_engine() -> None:
    engine = FakeEngine()
    app = create_app(Settings(), lambda *_: engine)
    async with app.router.lifespan_context(app):
        async with client_for(app) as client:
            await wait_until_healthy(client)
        assert not engine.shut_down
    assert engine.shut_down
