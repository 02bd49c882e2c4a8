"""OpenAI request fields that change nothing in the output are accepted within OpenAI's bounds; those that would
change it are a 400 saying so, unless they hold their neutral value."""

from __future__ import annotations

import httpx
import openai
import pytest
from fake_engine import FakeEngine
from test_http_errors import USER_HI, assert_error

ROUTES = {
    "/v1/completions": {"model": "base-model", "prompt": "hi"},
    "/v1/chat/completions": {"model": "base-model", "messages": USER_HI},
}
METADATA = {f"key-{i}": "v" * 512 for i in range(15)} | {"k" * 64: ""}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "fields",
    [
        {"store": False},
        {"store": None},
        {"metadata": METADATA},
        {"metadata": {}},
        {"metadata": None},
        *({"service_tier": tier} for tier in ("auto", "default", "flex", "scale", "priority", None)),
        {"user": "u-1", "store": False, "metadata": {"team": "search"}, "service_tier": "auto"},
    ],
)
async def test_fields_without_effect_are_accepted(
    client: httpx.AsyncClient, engine: FakeEngine, route: str, fields: dict
) -> None:
    plain = await client.post(route, json={**ROUTES[route], "seed": 1})
    response = await client.post(route, json={**ROUTES[route], "seed": 1, **fields})
    assert response.status_code == 200, response.text
    assert engine.submitted[-1].params == engine.submitted[-2].params
    assert engine.submitted[-1].prompt_token_ids == engine.submitted[-2].prompt_token_ids
    assert response.json()["choices"] == plain.json()["choices"]


@pytest.mark.parametrize(
    "fields",
    [
        {"parallel_tool_calls": True},
        {"parallel_tool_calls": False},
        {"parallel_tool_calls": None},
        {"modalities": ["text"]},
        {"modalities": None},
        {"prediction": None},
        {"audio": None},
    ],
)
async def test_chat_fields_with_their_neutral_value_are_accepted(client: httpx.AsyncClient, fields: dict) -> None:
    response = await client.post("/v1/chat/completions", json={**ROUTES["/v1/chat/completions"], **fields})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"store": True}, "store", "does not store completions"),
        ({"store": "no"}, "store", "boolean"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "at most 16"),
        ({"metadata": {"k" * 65: "v"}}, "metadata", "key 'kkk"),
        ({"metadata": {"team": "v" * 513}}, "metadata.team", "at most 512"),
        ({"metadata": {"team": 3}}, "metadata.team", "string"),
        ({"metadata": ["team"]}, "metadata", "dictionary"),
        ({"service_tier": "ultra"}, "service_tier", "'flex'"),
    ],
)
async def test_fields_outside_openai_bounds_are_400(
    client: httpx.AsyncClient, route: str, fields: dict, param: str, says: str
) -> None:
    response = await client.post(route, json={**ROUTES[route], **fields})
    error = assert_error(response, 400, "invalid_request_error", param)
    assert param in error["message"] and says in error["message"]


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"prediction": {"type": "content", "content": "hello"}}, "prediction", "predicted outputs are not supported"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "audio output is not supported"),
        ({"modalities": ["text", "audio"]}, "modalities", 'only ["text"]'),
        ({"modalities": ["audio"]}, "modalities", 'only ["text"]'),
        ({"modalities": []}, "modalities", 'only ["text"]'),
    ],
)
async def test_chat_fields_that_would_change_the_output_are_400(
    client: httpx.AsyncClient, fields: dict, param: str, says: str
) -> None:
    response = await client.post("/v1/chat/completions", json={**ROUTES["/v1/chat/completions"], **fields})
    error = assert_error(response, 400, "invalid_request_error", param)
    assert says in error["message"]


async def test_completions_do_not_take_chat_only_fields(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/completions", json={**ROUTES["/v1/completions"], "modalities": ["text"]})
    assert_error(response, 400, "invalid_request_error", "modalities")


async def test_the_openai_client_sends_them(oai: openai.AsyncOpenAI) -> None:
    reply = await oai.chat.completions.create(
        model="base-model", messages=USER_HI, store=False, metadata={"team": "search"}, service_tier="auto",
        parallel_tool_calls=False, modalities=["text"], user="u-1",
    )  # fmt: skip
    assert reply.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="does not store completions"):
        await oai.chat.completions.create(model="base-model", messages=USER_HI, store=True)


async def test_the_openapi_document_declares_them(client: httpx.AsyncClient) -> None:
    schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["store"]["enum"] == [False, None] and "does not store" in chat["store"]["description"]
    metadata = chat["metadata"]["anyOf"][0]
    assert (metadata["maxProperties"], metadata["propertyNames"], metadata["additionalProperties"]["maxLength"]) == (
        16, {"maxLength": 64}, 512,
    )  # fmt: skip
    assert chat["service_tier"]["anyOf"][0]["enum"] == ["auto", "default", "flex", "scale", "priority"]
    assert chat["prediction"]["enum"] == [None] and chat["audio"]["enum"] == [None]
    assert {"store", "metadata", "service_tier"} <= set(schemas["CompletionRequest"]["properties"])
