"""GET /v1/models and /v1/models/{model}: the base first, then adapters with the base as parent."""

from __future__ import annotations

import httpx


async def test_list_models(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models")
    assert response.status_code == 200
    assert response.json() == {
        "object": "list",
        "data": [
            {
                "id": "base-model",
                "object": "model",
                "created": 1_700_000_000,
                "owned_by": "loraplex",
                "parent": None,
                "root": "base-model",
                "permission": [],
                "generation_defaults": {},
            },
            *(
                {
                    "id": name,
                    "object": "model",
                    "created": 1_700_000_001,
                    "owned_by": "loraplex",
                    "parent": "base-model",
                    "root": "base-model",
                    "permission": [],
                    "generation_defaults": {},
                }
                for name in ("sql-writer", "poet")
            ),
        ],
    }


async def test_retrieve_model(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models/poet")
    assert response.status_code == 200
    assert response.json()["parent"] == "base-model"


async def test_retrieve_unknown_model(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models/nope")
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "model"


async def test_openapi_schema_builds(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(paths)


async def test_list_models_pages_with_after_and_limit(client: httpx.AsyncClient, engine) -> None:
    engine.adapters = tuple(f"a{i:03d}" for i in range(250))
    ids, after, pages = [], None, 0
    while True:
        params = {"limit": 100} | ({"after": after} if after else {})
        page = (await client.get("/v1/models", params=params)).json()
        pages += 1
        ids += [m["id"] for m in page["data"]]
        assert page["first_id"] == page["data"][0]["id"] and page["last_id"] == page["data"][-1]["id"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert pages == 3 and ids == ["base-model", *engine.adapters]


async def test_list_models_rejects_a_bad_cursor_or_limit(client: httpx.AsyncClient) -> None:
    for params in ({"after": "no-such-model"}, {"limit": 0}, {"limit": "x"}, {"limit": 10**6}):
        response = await client.get("/v1/models", params=params)
        assert response.status_code == 400, params
        assert response.json()["error"]["param"] in ("query.after", "query.limit")
    last = (await client.get("/v1/models", params={"after": "poet"})).json()
    assert last == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
