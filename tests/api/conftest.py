"""Fixtures: the app over a FakeEngine, with its lifespan running, and an async client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
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
