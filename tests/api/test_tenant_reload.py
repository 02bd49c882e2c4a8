"""POST /admin/keys/reload swaps the tenants without dropping running requests; an invalid file keeps the old ones."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from tenant_helpers import (
    ADAPTERS,
    ADMIN_TOKEN,
    SCOPES,
    Clock,
    GatedEngine,
    bearer,
    burst,
    running_client,
    statuses,
    tenant_settings,
    wait_for,
)
from tenant_helpers import write_keys as write_tenants

from server.api import create_app
from server.tenants.keys import hash_key

ADMIN = bearer(ADMIN_TOKEN)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return tmp_path / "keys.json"


@pytest.fixture
def keys(key_file: Path) -> dict[str, str]:
    return write_tenants(key_file)


@pytest.fixture
def settings(key_file: Path, keys: dict[str, str]):
    return tenant_settings(key_file)


@pytest.fixture
def engine() -> GatedEngine:
    return GatedEngine(adapters=ADAPTERS)


async def test_reload_swaps_keys_and_scopes(client, key_file, keys) -> None:
    new = write_tenants(key_file, {"acme": {"adapters": ["acme-sql"], "base_model": True}})
    response = await client.post("/admin/keys/reload", headers=ADMIN)
    assert response.status_code == 200 and response.json() == {"tenants": 1, "keys": 1}
    for old in keys.values():
        assert (await client.get("/v1/models", headers=bearer(old))).status_code == 401
    models = (await client.get("/v1/models", headers=bearer(new["acme"]))).json()["data"]
    assert [m["id"] for m in models] == ["base-model", "acme-sql"]


BROKEN = [
    ("{not json", "not valid JSON"),
    ('{"tenants": [{"name": "a", "keys": ["lpx-in-clear"]}]}', "tenants[0].keys[0]: a key must be stored as"),
    ('{"tenants": [{"name": "a", "adapter": ["x"]}]}', "tenants[0].adapter: Extra inputs are not permitted"),
    ('{"tenants": [{"name": "a"}, {"name": "a"}]}', "tenant 'a' is listed twice"),
    ('{"tenants": [{"name": "a", "requests_per_minute": 0}]}', "tenants[0].requests_per_minute"),
    ('{"tenants": [{"name": "a", "base_model": "yes"}]}', "tenants[0].base_model"),
    ('{"tenants": [{"name": "a/b"}]}', "tenants[0].name"),
    ('{"tenants": [{"name": "a", "adapters": ["../b"]}]}', "tenants[0].adapters[0]"),
    (json.dumps({"tenants": [{"name": "ops", "keys": [hash_key(ADMIN_TOKEN)]}]}), "admin token must stay separate"),
    (None, "cannot read it"),
]


@pytest.mark.parametrize(("content", "reason"), BROKEN)
async def test_an_invalid_file_keeps_the_old_keys(client, key_file, keys, content, reason) -> None:
    if content is None:
        key_file.unlink()
    else:
        key_file.write_text(content)
    response = await client.post("/admin/keys/reload", headers=ADMIN)
    assert response.status_code == 422
    assert reason in response.json()["error"]["message"]
    assert str(key_file) in response.json()["error"]["message"]
    models = (await client.get("/v1/models", headers=bearer(keys["acme"]))).json()["data"]
    assert len(models) == 3


async def test_reload_under_load(client, engine: GatedEngine, key_file, keys) -> None:
    """Requests held mid-flight finish whole across reloads; requests racing reloads are all served."""
    engine.gate.clear()
    running = [("acme", "acme-sql"), ("globex", "base-model")]
    held = [asyncio.ensure_future(burst(client, keys[tenant], 1, model)) for tenant, model in running]
    await wait_for(lambda: engine.held == 2)
    write_tenants(key_file, {"initech": SCOPES["globex"]})  # both running tenants lose their keys
    assert (await client.post("/admin/keys/reload", headers=ADMIN)).status_code == 200
    assert (await client.get("/v1/models", headers=bearer(keys["acme"]))).status_code == 401
    engine.gate.set()
    for task in held:
        (response,) = await task
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == "ab"

    current = write_tenants(key_file)
    await client.post("/admin/keys/reload", headers=ADMIN)

    async def reloads() -> None:
        for _ in range(20):
            assert (await client.post("/admin/keys/reload", headers=ADMIN)).status_code == 200

    results = await asyncio.gather(reloads(), burst(client, current["globex"], 30, "shared-search"))
    assert statuses(results[1]) == [200] * 30


async def test_usage_and_running_requests_carry_over(key_file, engine: GatedEngine) -> None:
    clock = Clock()
    keys = write_tenants(key_file, requests_per_minute=3, concurrent_requests=2)
    app = create_app(tenant_settings(key_file), lambda *_: engine, clock=clock)
    async with running_client(app) as client:
        engine.gate.clear()
        held = [asyncio.ensure_future(burst(client, keys["acme"], 1)) for _ in range(2)]
        await wait_for(lambda: engine.held == 2)
        raised = json.loads(key_file.read_text())
        for tenant in raised["tenants"]:
            tenant["concurrent_requests"] = 3
        key_file.write_text(json.dumps(raised))
        assert (await client.post("/admin/keys/reload", headers=ADMIN)).status_code == 200
        # The two still run across the reload: one more fits the new limit of 3 concurrent requests, a fourth not.
        third = asyncio.ensure_future(burst(client, keys["acme"], 1))
        await wait_for(lambda: engine.held == 3)
        refused = (await burst(client, keys["acme"], 1))[0]
        assert refused.status_code == 429 and "3 concurrent requests" in refused.json()["error"]["message"]
        engine.gate.set()
        assert [statuses(await task) for task in [*held, third]] == [[200]] * 3
        # The window carried over too: the minute's 3 requests are used up.
        refused = (await burst(client, keys["acme"], 1))[0]
        assert refused.status_code == 429 and "3 requests per minute" in refused.json()["error"]["message"]
        clock.advance(60)
        assert statuses(await burst(client, keys["acme"], 1)) == [200]
