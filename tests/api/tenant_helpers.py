"""Helpers for the tenant API tests: a key file of three tenants with overlapping scopes, a settable clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from api_helpers import wait_until_healthy
from fake_engine import FakeEngine
from fastapi import FastAPI

from server.settings import Settings
from server.tenants.keyfile import KeyFile, write_key_file
from server.tenants.keys import hash_key, new_key

ADMIN_TOKEN = "admin-secret"
ADAPTERS = ("acme-sql", "acme-poet", "globex-sql", "shared-summary", "shared-search", "internal")
# acme and globex overlap on shared-summary; base-only sees the base model alone.
SCOPES: dict[str, dict[str, Any]] = {
    "acme": {"adapters": ["acme-*", "shared-?ummary"], "base_model": False},
    "globex": {"adapters": ["globex-*", "shared-*"], "base_model": True},
    "base-only": {"adapters": [], "base_model": True},
}
VISIBLE = {
    "acme": ["acme-sql", "acme-poet", "shared-summary"],
    "globex": ["base-model", "globex-sql", "shared-summary", "shared-search"],
    "base-only": ["base-model"],
}


def write_keys(path: Path, scopes: dict[str, dict[str, Any]] = SCOPES, **limits: int) -> dict[str, str]:
    """Write a key file with one fresh key per tenant (each with `limits`); returns tenant name -> key."""
    keys = {name: new_key() for name in scopes}
    tenants = [{"name": name, "keys": [hash_key(keys[name])], **scope, **limits} for name, scope in scopes.items()]
    write_key_file(path, KeyFile.model_validate({"tenants": tenants}))
    return keys


def tenant_settings(key_file: Path, **overrides: Any) -> Settings:
    return Settings(max_request_bytes=64 * 1024, api_keys_file=key_file, admin_token=ADMIN_TOKEN, **overrides)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def completion(model: str, prompt: str = "hi", **fields: Any) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": 8, **fields}


def chat(model: str, content: str = "hi", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **fields}


class Clock:
    """A clock the test moves by hand, so quota windows are deterministic."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@asynccontextmanager
async def running_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client of `app` with its lifespan running and its engine ready."""
    transport = httpx.ASGITransport(app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await wait_until_healthy(client)
        yield client


class GatedEngine(FakeEngine):
    """Holds every request before its output number `hold_at` while the gate is closed; `held` counts those held."""

    def __init__(self, hold_at: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hold_at = hold_at
        self.gate = asyncio.Event()
        self.gate.set()
        self.held = 0

    async def generate(self, *args, **kwargs):
        index = 0
        async for output in super().generate(*args, **kwargs):
            if index == self.hold_at:
                self.held += 1
                try:
                    await self.gate.wait()
                finally:
                    self.held -= 1
            index += 1
            yield output


async def burst(client: httpx.AsyncClient, key: str, count: int, model: str = "acme-sql") -> list[httpx.Response]:
    body = completion(model, "abc", max_tokens=2)
    return list(await asyncio.gather(*(client.post("/v1/completions", json=body, headers=bearer(key))
                                       for _ in range(count))))  # fmt: skip


def statuses(responses: list[httpx.Response]) -> list[int]:
    return sorted(response.status_code for response in responses)


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise TimeoutError("condition never held")
