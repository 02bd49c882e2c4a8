"""The real default model over HTTP: its prepared folder recommends the sampling of its model card (temperature 0.2,
top_p 0.9), so a chat that leaves them out gets them, and /v1/models says so."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from api_helpers import wait_until_healthy

from server.api import create_app
from server.engine.factory import build_engine
from server.settings import Settings

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
async def client(default_model_dir) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(kv_cache_bytes=64 * 2**20, dtype="float32"), build_engine)
    transport = httpx.ASGITransport(app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        await wait_until_healthy(client, timeout_s=120)
        yield client


async def test_a_first_chat_without_temperature_answers_paris(client: httpx.AsyncClient) -> None:
    # The first request of a server started with --seed 0 draws a fixed seed, so this answer is reproducible. It is
    # not a certainty at this sampling: the first token is "The" (-1.88) or "L" (-1.97) about evenly, and 53 of 100
    # seeded samples named Paris (36 of 100 at the engine's own temperature 1; greedy always does).
    models = (await client.get("/v1/models")).json()["data"]
    assert models[0]["generation_defaults"] == {"temperature": 0.2, "top_p": 0.9}
    body = {"model": models[0]["id"], "messages": QUESTION, "max_tokens": 24}
    reply = (await client.post("/v1/chat/completions", json=body)).json()
    assert "Paris" in reply["choices"][0]["message"]["content"]
