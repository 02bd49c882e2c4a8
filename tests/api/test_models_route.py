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
