"""Fixtures: the app over a FakeEngine, with its lifespan running, and async clients for it (httpx, openai)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from api_helpers import wait_until_healthy
from fake_engine import FakeEngine
from fastapi import FastAPI

from server.api import create_app
from server.settings import Settings


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def settings() -> Settings:
    return Settings(max_request_bytes=64 * 1024)


@pytest.fixture
async def app(engine: FakeEngine, settings: Settings) -> AsyncIterator[FastAPI]:
    app = create_app(settings, lambda *_: engine)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
        await wait_until_healthy(client)
        yield client


@pytest.fixture
async def oai(app: FastAPI, client: httpx.AsyncClient) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official `openai` client talking to the app (once `client` saw it healthy)."""
    http_client = httpx.AsyncClient(transport=httpx.ASGITransport(app))
    async with openai.AsyncOpenAI(
        base_url="http://test/v1", api_key="x", http_client=http_client, max_retries=0
    ) as oai:
        yield oai
