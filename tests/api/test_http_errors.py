"""Every refusal has the OpenAI error shape and the right status, and names the offending field."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from api_helpers import wait_until_healthy
from fake_engine import FakeEngine
from fastapi import FastAPI

from server import errors

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
        ({"prompt": ["a", [1]]}, "prompt"),
        ({"prompt": {"text": "a"}}, "prompt"),
        ({"model": None}, "model"),
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
        ({"stop": 3}, "stop"),
        ({"ignore_eos": "sometimes"}, "ignore_eos"),
        ({"max_tokens": 100, "prompt": "a" * 100}, "max_tokens"),
    ],
)
async def test_bad_completion_fields(client: httpx.AsyncClient, fields: dict, param: str) -> None:
    response = await client.post("/v1/completions", json={"model": "base-model", "prompt": "hi", **fields})
    error = assert_error(response, 400, "invalid_request_error", param)
    assert param.split("[")[0] in error["message"]


async def test_context_overflow_names_both_numbers(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/completions", json={"model": "base-model", "prompt": "a" * 100, "max_tokens": 29})
    message = assert_error(response, 400, "invalid_request_error", "max_tokens")["message"]
    assert "100" in message and "29" in message


@pytest.mark.parametrize(
    "fields",
    [
        {"suffix": "end"},
        {"response_format": {"type": "json_object"}},
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
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"logprobs": "yes please"}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"logit_bias": {"1": 101}}, "logit_bias.1"),
    ],
)
async def test_bad_chat_fields(client: httpx.AsyncClient, fields: dict, param: str) -> None:
    response = await client.post("/v1/chat/completions", json={"model": "base-model", "messages": USER_HI, **fields})
    assert_error(response, 400, "invalid_request_error", param)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
async def test_unknown_model_is_404(client: httpx.AsyncClient, route: str) -> None:
    response = await client.post(route, json={"model": "nope", "prompt": "a", "messages": USER_HI})
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
    assert response.status_code == error.status_code
    assert response.json() == error.to_dict()
    assert "retry-after" not in response.headers
