"""A tenant sees and uses only the models in its scope; any other name answers exactly as a missing model does."""

from __future__ import annotations

import posixpath
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
from api_helpers import sse_payloads
from fake_engine import FakeEngine
from fastapi import FastAPI
from tenant_helpers import ADAPTERS, VISIBLE, bearer, chat, completion, tenant_settings, write_keys

from server.api.errors import error_body
from server.errors import model_not_found
from server.settings import Settings


class LooseEngine(FakeEngine):
    """Resolves names as a careless store might (path normalisation, case-insensitive files), to show that the
    scope, not the engine, stops the tricks."""

    def resolve_adapter(self, model: str) -> str | None:
        loose = posixpath.normpath(model.strip()).lower()
        return super().resolve_adapter(next((a for a in self.adapters if a.lower() == loose), model))


def test_the_loose_engine_would_be_fooled() -> None:
    engine = LooseEngine(adapters=(*ADAPTERS, "ACME-internal"))
    assert engine.resolve_adapter("acme-x/../globex-sql") == "globex-sql"
    assert engine.resolve_adapter("acme-internal") == "ACME-internal"


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    return write_keys(tmp_path / "keys.json")


@pytest.fixture
def settings(tmp_path: Path, keys: dict[str, str]) -> Settings:
    return tenant_settings(tmp_path / "keys.json")


@pytest.fixture
def engine() -> FakeEngine:
    return LooseEngine(adapters=(*ADAPTERS, "ACME-internal"))


@pytest.mark.parametrize("tenant", list(VISIBLE))
async def test_models_lists_only_the_scope(client, keys, tenant) -> None:
    response = await client.get("/v1/models", headers=bearer(keys[tenant]))
    assert [model["id"] for model in response.json()["data"]] == VISIBLE[tenant]
    for model in ["base-model", *ADAPTERS, "ACME-internal"]:
        response = await client.get(f"/v1/models/{model}", headers=bearer(keys[tenant]))
        assert response.status_code == (200 if model in VISIBLE[tenant] else 404), model
        if model not in VISIBLE[tenant]:
            assert response.json() == error_body(model_not_found(model))


@pytest.mark.parametrize("tenant", list(VISIBLE))
async def test_generation_only_within_the_scope(client, engine, keys, tenant) -> None:
    for model in ["base-model", *ADAPTERS]:
        for path, body in [("/v1/completions", completion(model)), ("/v1/chat/completions", chat(model))]:
            response = await client.post(path, json=body, headers=bearer(keys[tenant]))
            assert response.status_code == (200 if model in VISIBLE[tenant] else 404), (path, model)
    used = {submitted.adapter or "base-model" for submitted in engine.submitted}
    assert used == set(VISIBLE[tenant])  # nothing out of scope was ever queued


async def test_out_of_scope_is_indistinguishable_from_missing(client, engine, keys) -> None:
    """The same status, headers and body for an adapter of another tenant as once it has been deleted."""

    async def answers(model: str) -> list[tuple[int, dict, bytes]]:
        calls = [("GET", f"/v1/models/{model}", None), ("POST", "/v1/completions", completion(model)),
                 ("POST", "/v1/chat/completions", chat(model, stream=True)),
                 ("POST", "/tokenize", {"model": model, "prompt": "x"}),
                 ("POST", "/detokenize", {"model": model, "tokens": [120]})]  # fmt: skip
        responses = [await client.request(m, p, json=b, headers=bearer(keys["acme"])) for m, p, b in calls]
        return [(r.status_code, dict(r.headers), r.content) for r in responses]

    existing = await answers("globex-sql")
    engine.adapters = tuple(a for a in engine.adapters if a != "globex-sql")
    assert await answers("globex-sql") == existing
    assert {status for status, _, _ in existing} == {404}


TRICKS = [
    "ACME-SQL", "Acme-sql", "ACME-internal", "acme-internal",  # case variants; the last matches acme's glob
    "acme-x/../globex-sql", "acme-/../globex-sql", "./acme-sql/../globex-sql", "acme-sql/../../internal",
    "acme-sql/", " acme-sql", "acme-sql\n", "acme-*", "acme-?ql", "acme-[s]ql", "acme-sql\x00", "acme-%2e%2e",
    "shared-search", "shared-?ummary", "",
]  # fmt: skip


@pytest.mark.parametrize("model", TRICKS)
async def test_scope_escapes_are_404(client, engine, keys, model) -> None:
    calls = [("/v1/completions", completion(model)), ("/v1/chat/completions", chat(model)),
             ("/tokenize", {"model": model, "prompt": "x"})]  # fmt: skip
    for path, body in calls:
        response = await client.post(path, json=body, headers=bearer(keys["acme"]))
        assert response.status_code == 404, (path, model)
        assert response.json() == error_body(model_not_found(model))
    assert engine.submitted == []


async def test_path_tricks_on_retrieve_are_404_as_if_missing(client, engine, keys) -> None:
    paths = ["/v1/models/acme-x%2F..%2Fglobex-sql", "/v1/models/acme-sql/../globex-sql", "/v1/models/acme-sql%2f..",
             "/v1/models/%2e%2e", "/v1/models/acme-%2A", "/v1/models/ACME-internal"]  # fmt: skip

    async def answers() -> list[tuple[int, bytes]]:
        responses = [await client.get(path, headers=bearer(keys["acme"])) for path in paths]
        return [(response.status_code, response.content) for response in responses]

    existing = await answers()
    assert {status for status, _ in existing} == {404}
    engine.adapters = ("acme-sql",)
    assert await answers() == existing


async def test_adapters_added_later_follow_the_globs(client, engine, keys) -> None:
    engine.adapters = (*engine.adapters, "acme-new", "globex-new", "shared-new", "other-new")
    listed = (await client.get("/v1/models", headers=bearer(keys["acme"]))).json()["data"]
    assert [m["id"] for m in listed] == [*VISIBLE["acme"], "acme-new"]
    ok = await client.post("/v1/completions", json=completion("acme-new"), headers=bearer(keys["acme"]))
    assert ok.status_code == 200
    for model in ("globex-new", "shared-new", "other-new"):
        response = await client.post("/v1/completions", json=completion(model), headers=bearer(keys["acme"]))
        assert response.status_code == 404
    listed = (await client.get("/v1/models", headers=bearer(keys["globex"]))).json()["data"]
    assert [m["id"] for m in listed] == [*VISIBLE["globex"], "globex-new", "shared-new"]


async def test_streaming_in_and_out_of_scope(client, keys) -> None:
    body = chat("shared-summary", "hey", stream=True, stream_options={"include_usage": True})
    for tenant in ("acme", "globex"):
        response = await client.post("/v1/chat/completions", json=body, headers=bearer(keys[tenant]))
        events = sse_payloads(response)
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == "<user>he"
        assert events[-1]["usage"]["completion_tokens"] == 8
    response = await client.post("/v1/completions", json=completion("acme-sql", stream=True),
                                 headers=bearer(keys["globex"]))  # fmt: skip
    assert response.status_code == 404 and response.headers["content-type"] == "application/json"


@pytest.fixture
async def oai_for(app: FastAPI, client: httpx.AsyncClient) -> AsyncIterator:
    clients: list[openai.AsyncOpenAI] = []

    def make(api_key: str) -> openai.AsyncOpenAI:
        http_client = httpx.AsyncClient(transport=httpx.ASGITransport(app))
        clients.append(openai.AsyncOpenAI(base_url="http://test/v1", api_key=api_key, http_client=http_client,
                                          max_retries=0))  # fmt: skip
        return clients[-1]

    yield make
    for oai in clients:
        await oai.close()


async def test_openai_client_with_api_key(oai_for, keys) -> None:
    acme = oai_for(keys["acme"])
    assert [m.id async for m in acme.models.list()] == VISIBLE["acme"]
    completion_ = await acme.completions.create(model="acme-sql", prompt="abc", max_tokens=2)
    assert completion_.choices[0].text == "ab"
    stream = await acme.chat.completions.create(
        model="shared-summary", messages=[{"role": "user", "content": "x"}], stream=True, max_tokens=3
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "<us"
    with pytest.raises(openai.NotFoundError):
        await acme.completions.create(model="globex-sql", prompt="abc")
    with pytest.raises(openai.NotFoundError):
        await acme.models.retrieve("base-model")
    with pytest.raises(openai.AuthenticationError):
        await oai_for("lpx-not-a-key").models.list()
    base_only = oai_for(keys["base-only"])
    assert [m.id async for m in base_only.models.list()] == ["base-model"]
    reply = await base_only.chat.completions.create(model="base-model", messages=[{"role": "user", "content": "q"}])
    assert reply.choices[0].finish_reason == "stop"
