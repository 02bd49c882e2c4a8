"""Per-tenant limits under concurrent load: exactly the allowed number passes per window, the rest get 429 with a
Retry-After computed from the window, and a refused request queues nothing. The clock is the test's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fake_engine import FakeEngine
from fastapi import FastAPI
from tenant_helpers import (
    ADAPTERS,
    Clock,
    GatedEngine,
    bearer,
    burst,
    chat,
    completion,
    running_client,
    statuses,
    tenant_settings,
    wait_for,
    write_keys,
)

from server.api import create_app


@pytest.fixture
def engine() -> GatedEngine:
    return GatedEngine(adapters=ADAPTERS)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def limited_client(tmp_path: Path, engine: FakeEngine, clock: Clock, **limits: int) -> tuple[dict[str, str], FastAPI]:
    keys = write_keys(tmp_path / "keys.toml", **limits)
    app = create_app(tenant_settings(tmp_path / "keys.toml"), lambda *_: engine, clock=clock)
    return keys, app


@pytest.fixture
async def rpm(tmp_path, engine, clock) -> AsyncIterator[tuple[dict[str, str], httpx.AsyncClient]]:
    keys, app = limited_client(tmp_path, engine, clock, requests_per_minute=5)
    async with running_client(app) as client:
        yield keys, client


async def test_requests_per_minute_admit_exactly_the_limit(rpm, engine, clock) -> None:
    keys, client = rpm
    responses = await burst(client, keys["acme"], 20)
    assert statuses(responses) == [200] * 5 + [429] * 15
    refused = [r for r in responses if r.status_code == 429]
    assert {r.headers["retry-after"] for r in refused} == {"60"}
    error = refused[0].json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert "5 requests per minute" in error["message"]
    assert len(engine.submitted) == 5  # the refused ones queued nothing
    assert statuses(await burst(client, keys["globex"], 7, "globex-sql")) == [200] * 5 + [429] * 2
    clock.advance(30)
    response = (await burst(client, keys["acme"], 1))[0]
    assert response.status_code == 429 and response.headers["retry-after"] == "30"
    clock.advance(30)
    assert statuses(await burst(client, keys["acme"], 20)) == [200] * 5 + [429] * 15


async def test_the_window_slides(rpm, clock) -> None:
    keys, client = rpm
    assert statuses(await burst(client, keys["acme"], 3)) == [200] * 3
    clock.advance(20)
    assert statuses(await burst(client, keys["acme"], 4)) == [200] * 2 + [429] * 2
    clock.advance(10)
    assert (await burst(client, keys["acme"], 1))[0].headers["retry-after"] == "30"
    clock.advance(30)  # the three of t=0 leave the window, the two of t=20 stay
    assert statuses(await burst(client, keys["acme"], 10)) == [200] * 3 + [429] * 7
    assert (await burst(client, keys["acme"], 1))[0].headers["retry-after"] == "20"


async def test_generated_tokens_per_minute(tmp_path, engine, clock) -> None:
    keys, app = limited_client(tmp_path, engine, clock, tokens_per_minute=10)
    async with running_client(app) as client:
        key = bearer(keys["acme"])
        body = completion("acme-sql", "abcdefgh", max_tokens=8)
        assert (await client.post("/v1/completions", json=body, headers=key)).status_code == 200
        clock.advance(20)
        streamed = await client.post("/v1/completions", json={**body, "stream": True}, headers=key)
        assert streamed.status_code == 200  # 8 tokens are under 10; this one takes the total to 16
        clock.advance(10)
        refused = await client.post("/v1/chat/completions", json=chat("acme-sql"), headers=key)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "30"
        assert "10 generated tokens per minute" in refused.json()["error"]["message"]
        clock.advance(30)  # the first 8 tokens leave the window: 8 < 10
        assert (await client.post("/v1/completions", json=body, headers=key)).status_code == 200
        metrics = (await client.get("/metrics")).text
    assert 'loraplex_tenant_generation_tokens_total{tenant="acme"} 24.0' in metrics
    assert 'loraplex_tenant_requests_total{tenant="acme"} 3.0' in metrics
    assert 'loraplex_tenant_refusals_total{status="429",tenant="acme"} 1.0' in metrics


async def test_concurrent_requests(tmp_path, engine: GatedEngine, clock) -> None:
    keys, app = limited_client(tmp_path, engine, clock, concurrent_requests=2)
    async with running_client(app) as client:
        engine.gate.clear()
        held = [asyncio.ensure_future(burst(client, keys["acme"], 1)) for _ in range(2)]
        await wait_for(lambda: engine.held == 2)
        refused = await burst(client, keys["acme"], 6)
        assert statuses(refused) == [429] * 6
        assert {r.headers["retry-after"] for r in refused} == {"1"}
        assert "2 concurrent requests" in refused[0].json()["error"]["message"]
        other = asyncio.ensure_future(burst(client, keys["globex"], 1, "globex-sql"))  # its own limit
        await wait_for(lambda: engine.held == 3)
        engine.gate.set()
        assert [statuses(await task) for task in held] == [[200], [200]]
        assert statuses(await other) == [200]
        assert statuses(await burst(client, keys["acme"], 2)) == [200, 200]


async def test_a_stream_holds_its_place_until_it_ends(tmp_path, clock) -> None:
    engine = GatedEngine(hold_at=1, adapters=ADAPTERS)  # the response has started when the stream is held
    keys, app = limited_client(tmp_path, engine, clock, concurrent_requests=1)
    async with running_client(app) as client:
        engine.gate.clear()
        body = completion("acme-sql", "abcdef", stream=True)
        stream = asyncio.ensure_future(client.post("/v1/completions", json=body, headers=bearer(keys["acme"])))
        await wait_for(lambda: engine.held == 1)
        assert statuses(await asyncio.wait_for(burst(client, keys["acme"], 3), 10)) == [429] * 3
        engine.gate.set()
        assert (await stream).text.endswith("data: [DONE]\n\n")
        assert statuses(await burst(client, keys["acme"], 1)) == [200]
