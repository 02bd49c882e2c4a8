"""With an API keys file, every /v1 route and /tokenize, /detokenize need a tenant's key (401 otherwise); /health and
/metrics stay open, and the admin token is neither a tenant key nor accepted on /v1."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
from fake_engine import FakeEngine
from tenant_helpers import ADAPTERS, ADMIN_TOKEN, bearer, chat, completion, running_client, tenant_settings, write_keys

from server.api import create_app
from server.errors import KeyFileError
from server.settings import Settings
from server.tenants.keys import hash_key

ROUTES = [
    ("POST", "/v1/completions", completion("globex-sql")),
    ("POST", "/v1/chat/completions", chat("globex-sql")),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/globex-sql", None),
    ("POST", "/tokenize", {"model": "globex-sql", "prompt": "hi"}),
    ("POST", "/detokenize", {"model": "globex-sql", "tokens": [104, 105]}),
]


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    return write_keys(tmp_path / "keys.toml")


@pytest.fixture
def settings(tmp_path: Path, keys: dict[str, str]) -> Settings:
    return tenant_settings(tmp_path / "keys.toml")


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(adapters=ADAPTERS)


async def call(client: httpx.AsyncClient, method: str, path: str, body: dict | None, **kw) -> httpx.Response:
    return await client.request(method, path, json=body, **kw)


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_every_v1_route_needs_a_known_key(client, keys, method, path, body) -> None:
    key = keys["globex"]
    refused = [{}, bearer("lpx-wrong"), bearer(key + "x"), bearer(key[:-1]), bearer(key.upper()), bearer(""),
               {"Authorization": f"Basic {key}"}, {"Authorization": key}, bearer(ADMIN_TOKEN)]  # fmt: skip
    for headers in refused:
        response = await call(client, method, path, body, headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["type"] == "authentication_error"
        assert "Authorization: Bearer" in response.json()["error"]["message"]
    assert (await call(client, method, path, body, headers=bearer(key))).status_code == 200


async def test_health_metrics_and_openapi_stay_open(client) -> None:
    for path in ("/health", "/metrics", "/openapi.json"):
        assert (await client.get(path)).status_code == 200


async def test_openapi_declares_the_tenant_key_scheme(client) -> None:
    document = (await client.get("/openapi.json")).json()
    assert document["components"]["securitySchemes"]["TenantKey"]["scheme"] == "bearer"
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        operation = document["paths"][path]["post"]
        assert {"TenantKey": []} in operation["security"]
        assert {"401", "404"} <= set(operation["responses"])
        assert ("429" in operation["responses"]) == path.startswith("/v1")  # only generation is rate-limited
        assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]
    assert "401" in document["paths"]["/v1/models"]["get"]["responses"]


async def test_a_tenant_key_is_not_an_admin_token(client, keys) -> None:
    response = await client.post("/admin/keys/reload", headers=bearer(keys["globex"]))
    assert response.status_code == 401
    assert (await client.post("/admin/keys/reload")).status_code == 401
    response = await client.post("/admin/keys/reload", headers=bearer(ADMIN_TOKEN))
    assert response.status_code == 200 and response.json() == {"tenants": 3, "keys": 3}


async def test_a_key_file_holding_the_admin_token_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(f'{{"tenants": [{{"name": "ops", "keys": ["{hash_key(ADMIN_TOKEN)}"]}}]}}')
    with pytest.raises(KeyFileError, match="admin token must stay separate"):
        create_app(tenant_settings(path), lambda *_: FakeEngine())


async def test_without_a_key_file_v1_stays_open(engine: FakeEngine) -> None:
    async with running_client(create_app(Settings(), lambda *_: engine)) as client:
        for method, path, body in ROUTES:
            assert (await call(client, method, path, body)).status_code == 200
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert "security" not in paths["/v1/completions"]["post"]
        assert "401" not in paths["/v1/completions"]["post"]["responses"]


async def test_refusals_are_counted_by_tenant(client, keys) -> None:
    await client.get("/v1/models", headers=bearer("lpx-wrong"))
    await client.post("/v1/completions", json=completion("globex-sql"), headers=bearer(keys["acme"]))
    await client.get("/v1/models/nope", headers=bearer(keys["globex"]))
    await client.post("/v1/completions", json=completion("globex-sql"), headers=bearer(keys["globex"]))
    text = (await client.get("/metrics")).text
    assert 'loraplex_tenant_refusals_total{status="401",tenant=""} 1.0' in text
    assert 'loraplex_tenant_refusals_total{status="404",tenant="acme"} 1.0' in text
    assert 'loraplex_tenant_refusals_total{status="404",tenant="globex"} 1.0' in text
    assert 'loraplex_tenant_requests_total{tenant="globex"} 1.0' in text
    assert 'loraplex_tenant_generation_tokens_total{tenant="globex"} 2.0' in text


async def test_keys_never_reach_the_log(client, keys, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.DEBUG)
    await client.post("/v1/completions", json=completion("globex-sql"), headers=bearer(keys["globex"]))
    await client.get("/v1/models", headers=bearer(keys["globex"] + "x"))
    await client.post("/admin/keys/reload", headers=bearer(ADMIN_TOKEN))
    create_app(tenant_settings(tmp_path / "keys.toml"), lambda *_: FakeEngine())
    assert "3 tenants with 3 keys" in caplog.text
    for key in keys.values():
        assert key not in caplog.text
        assert hash_key(key).removeprefix("sha256:") not in caplog.text


async def test_reload_without_a_key_file_is_409() -> None:
    async with running_client(create_app(Settings(admin_token=ADMIN_TOKEN), lambda *_: FakeEngine())) as client:
        response = await client.post("/admin/keys/reload", headers=bearer(ADMIN_TOKEN))
    assert response.status_code == 409
    assert "--api-keys" in response.json()["error"]["message"]
