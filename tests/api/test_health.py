"""Lifecycle: the server answers at once, 503 until the engine is built, the reason if it fails, shutdown at exit;
then 503 with the reason whenever the engine stops, keeps failing its steps or stalls."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import httpx
import pytest
from api_helpers import wait_until_healthy
from fake_engine import FakeEngine
from fastapi import FastAPI

from server.api import create_app
from server.engine.async_engine import AsyncEngine
from server.engine.factory import build_engine
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
    engine.ready = False  # a built engine that is not ready has stopped: no route says it is still loading
    assert_unavailable(await client.get("/health"), "the engine has stopped")
    assert_unavailable(await client.post("/v1/completions", json=COMPLETION), "the engine has stopped")


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


async def test_an_engine_problem_is_the_503_reason(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.problem = "the last 3 engine steps failed; the server log has the details"
    assert_unavailable(await client.get("/health"), engine.problem)
    engine.problem = None
    assert (await client.get("/health")).status_code == 200


@pytest.fixture
async def real(tiny_model_dir) -> AsyncIterator[tuple[httpx.AsyncClient, AsyncEngine]]:
    """The app over a real engine on the tiny model, with a short watchdog and failure limit."""
    settings = Settings(model=tiny_model_dir, kv_cache_bytes=2**20, block_size=4, served_model_name="tiny",
                        health_stall_s=0.5, health_max_step_failures=2)  # fmt: skip
    app = create_app(settings, build_engine)
    async with app.router.lifespan_context(app), client_for(app) as client:
        await wait_until_healthy(client, timeout_s=60)
        yield client, app.state.engine_state.engine


TINY = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}


async def test_repeated_step_failures_answer_503_until_a_step_succeeds(real, monkeypatch) -> None:
    client, engine = real
    execute = engine.core.runner.execute

    def broken(*args, **kwargs):
        raise RuntimeError("secret device state")

    monkeypatch.setattr(engine.core.runner, "execute", broken)
    for i in range(2):
        response = await client.post("/v1/completions", json=TINY)
        assert response.status_code == 500 and "secret" not in response.text
        if i == 0:
            assert (await client.get("/health")).status_code == 200  # one failure is not a pattern
    assert_unavailable(await client.get("/health"), "the last 2 engine steps failed; the server log has the details")
    monkeypatch.setattr(engine.core.runner, "execute", execute)
    assert (await client.post("/v1/completions", json=TINY)).status_code == 200
    assert (await client.get("/health")).status_code == 200
    metrics = (await client.get("/metrics")).text
    assert "loraplex_engine_step_failures_total 2.0" in metrics
    assert "loraplex_engine_request_failures_total 2.0" in metrics


async def test_a_stalled_engine_answers_503_while_it_has_work(real, monkeypatch) -> None:
    client, engine = real
    release = threading.Event()
    step = engine.core.step

    def stuck():
        release.wait(timeout=30)
        return step()

    monkeypatch.setattr(engine.core, "step", stuck)
    pending = asyncio.ensure_future(client.post("/v1/completions", json=TINY))
    try:
        for _ in range(300):
            response = await client.get("/health")
            if response.status_code == 503:
                break
            await asyncio.sleep(0.01)
        assert response.status_code == 503
        assert "the engine has work but finished no step for" in response.json()["error"]["message"]
        assert "--health-stall-s" in response.json()["error"]["message"]
    finally:
        release.set()
    assert (await pending).status_code == 200
    assert (await client.get("/health")).status_code == 200


async def test_a_dead_engine_thread_answers_503(real, monkeypatch) -> None:
    client, engine = real

    def die():
        raise KeyboardInterrupt  # no `except Exception` stops it: the engine thread ends

    monkeypatch.setattr(engine.core, "step", die)
    assert (await client.post("/v1/completions", json=TINY)).status_code in (500, 503)
    engine._thread.join(timeout=10)
    reason = "the engine thread stopped after an internal error; the server log has the details"
    assert_unavailable(await client.get("/health"), reason)
    assert_unavailable(await client.post("/v1/completions", json=TINY), reason)  # every route says why, not "loading"
