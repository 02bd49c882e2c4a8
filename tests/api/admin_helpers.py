"""Helpers for the admin API tests: the app over a real engine on a tiny model, and multipart uploads."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from api_helpers import wait_until_healthy
from fastapi import FastAPI
from transformers import AutoTokenizer

from server.adapters.registry import AdapterRegistry
from server.api import create_app
from server.engine.factory import build_engine
from server.settings import Settings
from tests.helpers import peft_greedy

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def admin_settings(model_dir: Path, store: Path, **overrides: Any) -> Settings:
    base = dict(model=model_dir, adapters_store=store, admin_token=TOKEN, kv_cache_bytes=2**21, block_size=4,
                max_loras=4, max_cpu_loras=8, served_model_name="tiny", dtype="float32")  # fmt: skip
    return Settings(**{**base, **overrides})


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    """The app with a real engine, its lifespan running, and a client for it."""
    app = create_app(settings, build_engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            await wait_until_healthy(client, timeout_s=60)
            yield client, app


def registry_of(app: FastAPI) -> AdapterRegistry:
    return app.state.engine_state.engine.adapters


def files_of(folder: Path) -> dict[str, tuple[str, bytes]]:
    """The two files of a PEFT folder as the upload's file fields."""
    return {
        "config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
        "weights": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes()),
    }


async def upload(
    client: httpx.AsyncClient,
    name: str,
    folder: Path | None = None,
    *,
    files: dict[str, tuple[str, bytes]] | None = None,
    headers: dict[str, str] = AUTH,
    **fields: str,
) -> httpx.Response:
    """POST /admin/adapters with `folder`'s files (or `files`) and the form `fields`."""
    return await client.post(
        "/admin/adapters", data={"name": name, **fields}, files=files or files_of(folder), headers=headers
    )


async def complete(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int, **extra: Any) -> str:
    """A greedy completion of exactly `max_tokens` tokens; its text."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "min_tokens": max_tokens}
    response = await client.post("/v1/completions", json={**body, **extra})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def peft_text(model_dir: Path, adapter: Path | None, prompt: list[int], max_tokens: int) -> str:
    """What transformers + PEFT generate greedily with `adapter`, as completion text."""
    tokens = peft_greedy(model_dir, adapter, prompt, max_tokens)
    return AutoTokenizer.from_pretrained(model_dir).decode(tokens, skip_special_tokens=True)


def store_entries(store: Path) -> list[str]:
    """Everything in the store directory, hidden entries included."""
    return sorted(p.name for p in store.iterdir()) if store.exists() else []
