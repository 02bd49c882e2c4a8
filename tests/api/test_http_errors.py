"""Every refusal has the OpenAI error shape and the right status, and names the offending field."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from api_helpers import wait_until_healthy
from fake_engine import FakeEngine
from fastapi import FastAPI

from server import errors
from server.api import create_app
from server.api.errors import error_body, status_of
from server.settings import Settings

USER_HI = [{"role": "user", "content": "hi"}]


def assert_error(response: httpx.Response, status: int, error_type: str, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == (error_type, param)
    return error


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", ""]}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": [1, 2**31]}, "prompt"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -1, "echo": True}, "max_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"presence_penalty": -2.1}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": -100.5}}, "logit_bias.5"),
        ({"logit_bias": {"5": 1, "400": 2}}, "logit_bias"),
        ({"min_p": 1.5}, "min_p"),
        ({"stop_token_ids": [-1]}, "stop_token_ids[0]"),
        ({"stop_token_ids": [1000]}, "stop_token_ids"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"best_of": 3, "stream": True}, "best_of"),
        ({"best_of": 3, "temperature": 0}, "best_of"),
        ({"best_of": 200}, "best_of"),
        ({"logprobs": -1}, "logprobs"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"n": 0}, "n"),
        ({"stop": [""]}, "stop[0]"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"stop": ["x" * 257]}, "stop[0]"),
        ({"max_tokens": 100, "prompt": "a" * 100}, "max_tokens"),
        ({"seed": 2**63}, "seed"),
        ({"repetition_penalty": 1e-300}, "repetition_penalty"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"seed": 2**63 - 1, "n": 2}, "seed"),
        ({"top_k": 2**31}, "top_k"),
        ({"max_tokens": 2**31}, "max_tokens"),
        ({"n": 129}, "n"),
        ({"prompt": ["a"] * 65}, "prompt"),
        ({"prompt": ["a"] * 40, "n": 10}, "n"),
        ({"colour": "red"}, "colour"),
        ({"best_of_three": 1}, "best_of_three"),
        ({"stream_options": {"include_usage": True, "extra": 1}}, "stream_options.extra"),
    ],
)
async def test_bad_completion_fields(client: httpx.AsyncClient, fields: dict, param: str) -> None:
    response = await client.post("/v1/completions", json={"model": "base-model", "prompt": "hi", **fields})
    error = assert_error(response, 400, "invalid_request_error", param)
    assert param.split("[")[0] in error["message"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stream": "yes"}, "stream"),
        ({"ignore_eos": "sometimes"}, "ignore_eos"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"temperature": "0.5"}, "temperature"),
        ({"n": "2"}, "n"),
        ({"seed": True}, "seed"),
        ({"stop": 3}, "stop"),
        ({"model": None}, "model"),
        ({"prompt": ["a", [1]]}, "prompt"),
        ({"prompt": {"text": "a"}}, "prompt"),
        ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ],
)
async def test_values_of_the_wrong_json_type_are_400(client: httpx.AsyncClient, fields: dict, param: str) -> None:
    response = await client.post("/v1/completions", json={"model": "base-model", "prompt": "hi", **fields})
    error = assert_error(response, 400, "invalid_request_error", param)
    assert param.split("[")[0] in error["message"]


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 9e-6])
async def test_temperatures_that_would_underflow_are_greedy(
    client: httpx.AsyncClient, engine: FakeEngine, temperature: float
) -> None:
    response = await client.post(
        "/v1/completions", json={"model": "base-model", "prompt": "hi", "temperature": temperature}
    )
    assert response.status_code == 200, response.text
    assert engine.submitted[-1].params.temperature == 0.0


async def test_the_body_may_not_hold_nan(client: httpx.AsyncClient) -> None:
    body = b'{"model": "base-model", "prompt": "hi", "temperature": NaN}'
    response = await client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_request_error", "temperature")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "base-model", "prompt": "a\\\\ud800b"}', None),
        (b'{"model": "base-model", "prompt": "a\ud800b"}', "prompt"),
        (b'{"model": "base-model", "prompt": ["ok", "\udfff"]}', "prompt[1]"),
        (b'{"model": "base-model", "prompt": "a", "stop": ["\ud83d"]}', "stop[0]"),
        (b'{"model": "\ud800", "prompt": "a"}', "model"),
        (b'{"model": "base-model", "prompt": "a", "\ud800": 1}', "\\ud800"),
    ],
)
async def test_lone_surrogates_are_400_naming_the_field(client: httpx.AsyncClient, body: bytes, param: str) -> None:
    response = await client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    if param is None:  # an escaped backslash: plain text
        assert response.status_code == 200, response.text
        return
    error = assert_error(response, 400, "invalid_request_error", param)
    assert "surrogate" in error["message"]


async def test_chat_content_with_a_lone_surrogate_is_400(client: httpx.AsyncClient) -> None:
    body = b'{"model": "base-model", "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}'
    response = await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_request_error", "messages[0].content[0].text")


@pytest.mark.parametrize("depth", [33, 5000])
async def test_deeply_nested_bodies_are_400(client: httpx.AsyncClient, depth: int) -> None:
    body = '{"model": "base-model", "prompt": "a", "user": ' + "[" * depth + "]" * depth + "}"
    response = await client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"] or "user").startswith("user") and "nested deeper than 32" in error["message"]


async def test_bounds_follow_the_settings(engine: FakeEngine) -> None:
    settings = Settings(max_prompts=2, max_stop_strings=1, max_messages=1, max_text_chars=3, max_stop_chars=2)
    app = create_app(settings, lambda *_: engine)
    async with app.router.lifespan_context(app), _client(app) as client:
        await wait_until_healthy(client)
        for fields, param in [
            ({"prompt": ["a", "b", "c"]}, "prompt"),
            ({"prompt": "abcd"}, "prompt"),
            ({"stop": ["a", "b"]}, "stop"),
            ({"stop": "abc"}, "stop[0]"),
        ]:
            response = await client.post("/v1/completions", json={"model": "base-model", "prompt": "hi", **fields})
            assert_error(response, 400, "invalid_request_error", param)
        two = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        response = await client.post("/v1/chat/completions", json={"model": "base-model", "messages": two})
        error = assert_error(response, 400, "invalid_request_error", "messages")
        assert "--max-messages" in error["message"]
        long = [{"role": "user", "content": "abcd"}]
        response = await client.post("/v1/chat/completions", json={"model": "base-model", "messages": long})
        assert_error(response, 400, "invalid_request_error", "messages[0].content")
        schema = (await client.get("/openapi.json")).json()["components"]["schemas"]
        assert schema["ChatCompletionRequest"]["properties"]["messages"]["maxItems"] == 1


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test")


async def test_context_overflow_names_both_numbers(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/completions", json={"model": "base-model", "prompt": "a" * 100, "max_tokens": 29})
    message = assert_error(response, 400, "invalid_request_error", "max_tokens")["message"]
    assert "100" in message and "29" in message


@pytest.mark.parametrize(
    "fields",
    [
        {"suffix": "end"},
    ],
)
async def test_unsupported_completion_fields(client: httpx.AsyncClient, fields: dict) -> None:
    response = await client.post("/v1/completions", json={"model": "base-model", "prompt": "hi", **fields})
    (name,) = fields
    error = assert_error(response, 400, "invalid_request_error", name)
    assert error["message"] == f"{name}: not supported by this server"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x", "weight": 1}]}, "messages[0].weight"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "cache": 1}]}]},
            "messages[0].content",
        ),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f g"}}], "tool_choice": "required"},
            "tools[0].function.name",
        ),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"logit_bias": {"1": 101}}, "logit_bias.1"),
    ],
)
async def test_bad_chat_fields(client: httpx.AsyncClient, fields: dict, param: str) -> None:
    response = await client.post("/v1/chat/completions", json={"model": "base-model", "messages": USER_HI, **fields})
    assert_error(response, 400, "invalid_request_error", param)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"stream": 1}, "stream"),
        ({"logprobs": "yes please"}, "logprobs"),
    ],
)
async def test_chat_values_of_the_wrong_json_type_are_400(client: httpx.AsyncClient, fields: dict, param: str) -> None:
    response = await client.post("/v1/chat/completions", json={"model": "base-model", "messages": USER_HI, **fields})
    assert_error(response, 400, "invalid_request_error", param)


async def test_ignored_fields_are_accepted(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    messages = [{"role": "user", "content": "hi", "name": "ann"}]
    body = {"model": "base-model", "messages": messages, "user": "u-1"}
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    assert "ann" not in "".join(map(chr, engine.submitted[-1].prompt_token_ids))


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
async def test_unknown_model_is_404(client: httpx.AsyncClient, route: str) -> None:
    body = {"model": "nope", "prompt": "a"} if route == "/v1/completions" else {"model": "nope", "messages": USER_HI}
    response = await client.post(route, json=body)
    error = assert_error(response, 404, "not_found_error", "model")
    assert "nope" in error["message"]


async def test_queue_full_is_429_with_retry_after(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.queue_full = True
    response = await client.post("/v1/chat/completions", json={"model": "base-model", "messages": USER_HI})
    assert_error(response, 429, "rate_limit_error", None)
    assert response.headers["retry-after"] == "7"


async def test_malformed_json(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/completions", content=b'{"model": "base-model", "prompt": ', headers={"content-type": "application/json"}
    )
    error = assert_error(response, 400, "invalid_request_error", None)
    assert error["message"].startswith("request body is not valid JSON")


async def test_body_that_is_not_an_object(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/completions", json=["a"])
    error = assert_error(response, 400, "invalid_request_error", None)
    assert "JSON object" in error["message"]


async def test_unknown_route_is_404(client: httpx.AsyncClient) -> None:
    error = assert_error(await client.get("/v1/nothing"), 404, "not_found_error", None)
    assert "/v1/nothing" in error["message"]


async def test_wrong_method_is_405(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/completions"), 405, "invalid_request_error", None)


async def test_body_over_the_limit_by_content_length(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/completions", json={"model": "base-model", "prompt": "a" * 70_000})
    error = assert_error(response, 413, "invalid_request_error", None)
    assert str(64 * 1024) in error["message"]


async def test_chunked_body_over_the_limit(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "base-model", "prompt": "'
        for _ in range(100):
            yield b"a" * 1000
        yield b'"}'

    response = await client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "invalid_request_error", None)
    assert engine.submitted == []


async def test_chunked_body_under_the_limit(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "base-model", '
        yield b'"prompt": "abc"}'

    response = await client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 200


async def test_unexpected_exception_is_a_500_that_leaks_nothing(app: FastAPI, engine: FakeEngine) -> None:
    def explode(prompt: str) -> list[int]:
        raise RuntimeError("secret internals at 0xdeadbeef")

    engine.encode_prompt = explode  # type: ignore[method-assign]
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        await wait_until_healthy(client)
        response = await client.post("/v1/completions", json={"model": "base-model", "prompt": "a"})
    error = assert_error(response, 500, "internal_error", None)
    assert error["message"] == "internal server error"
    assert "secret" not in response.text


async def test_body_without_json_content_type(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/completions", content=b'{"model": "base-model", "prompt": "a"}')
    error = assert_error(response, 400, "invalid_request_error", None)
    assert "Content-Type: application/json" in error["message"]


@pytest.mark.parametrize(
    "error",
    [
        errors.InvalidRequestError("bad", param="x"),
        errors.AuthenticationError("who are you"),
        errors.PermissionDeniedError("switched off"),
        errors.NotFoundError("gone", code="model_not_found"),
        errors.ConflictError("exists"),
        errors.PayloadTooLargeError("big"),
        errors.UnsupportedMediaError("zip"),
        errors.ValidationError("bad adapter"),
        errors.AdapterError("rank too high", param="r"),
        errors.ServiceUnavailableError("stopping"),
        errors.LoraplexError("generation failed: boom"),
    ],
)
async def test_every_loraplex_error_maps_to_its_status(
    client: httpx.AsyncClient, engine: FakeEngine, error: errors.LoraplexError
) -> None:
    def refuse(model: str) -> str:
        raise error

    engine.resolve_adapter = refuse  # type: ignore[method-assign]
    response = await client.post("/v1/completions", json={"model": "base-model", "prompt": "a"})
    assert response.status_code == status_of(type(error))
    assert response.json() == error_body(error)
    assert "retry-after" not in response.headers


async def test_integral_numbers_are_integers_as_in_json_schema(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    body = {"model": "base-model", "prompt": [104.0, 105], "n": 2.0, "max_tokens": 3.0, "seed": 7.0}
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert [(s.prompt_token_ids, s.params.seed, s.params.max_tokens) for s in engine.submitted] == [
        ([104, 105], 7, 3),
        ([104, 105], 8, 3),
    ]


async def test_405_allows_every_method_of_the_path(client: httpx.AsyncClient) -> None:
    response = await client.put("/admin/adapters/x")
    assert response.status_code == 405
    assert response.headers["allow"] == "DELETE, GET, PATCH"
