"""`stream: true`: SSE framing, chunk shapes, include_usage, n > 1, errors before and during the stream."""

from __future__ import annotations

import json

import httpx
from api_helpers import sse_payloads
from fake_engine import FakeEngine

USER_HI = [{"role": "user", "content": "hi"}]


async def test_completion_stream(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/completions", json={"model": "base-model", "prompt": "abc", "max_tokens": 2, "stream": True}
    )
    assert response.headers["cache-control"] == "no-cache"
    chunks = sse_payloads(response)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert all(c["object"] == "text_completion" and c["model"] == "base-model" for c in chunks)
    assert [c["choices"] for c in chunks] == [
        [{"index": 0, "text": "a", "logprobs": None, "finish_reason": None}],
        [{"index": 0, "text": "b", "logprobs": None, "finish_reason": "length"}],
    ]
    assert all(c["usage"] is None for c in chunks)


async def test_completion_stream_include_usage(client: httpx.AsyncClient) -> None:
    body = {"model": "base-model", "prompt": ["ab", "c"], "stream": True, "stream_options": {"include_usage": True}}
    chunks = sse_payloads(await client.post("/v1/completions", json=body))
    *content, last = chunks
    assert last["choices"] == []
    assert last["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 3,
        "total_tokens": 6,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    texts: dict[int, str] = {}
    for chunk in content:
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: "ab", 1: "c"}
    finals = [c["choices"][0] for c in content if c["choices"][0]["finish_reason"]]
    assert sorted((f["index"], f["finish_reason"]) for f in finals) == [(0, "stop"), (1, "stop")]


async def test_chat_stream(client: httpx.AsyncClient) -> None:
    body = {"model": "base-model", "messages": USER_HI, "max_tokens": 2, "stream": True}
    chunks = sse_payloads(await client.post("/v1/chat/completions", json=body))
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert [c["choices"] for c in chunks] == [
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": "<"}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {"content": "u"}, "logprobs": None, "finish_reason": "length"}],
    ]


async def test_chat_stream_n_and_usage(client: httpx.AsyncClient) -> None:
    body = {
        "model": "base-model",
        "messages": USER_HI,
        "max_tokens": 3,
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    *content, last = sse_payloads(await client.post("/v1/chat/completions", json=body))
    roles = [c["choices"][0]["index"] for c in content if c["choices"][0]["delta"].get("role")]
    assert roles == [0, 1]
    texts = {0: "", 1: ""}
    for chunk in content:
        texts[chunk["choices"][0]["index"]] += chunk["choices"][0]["delta"].get("content", "")
    assert texts == {0: "<us", 1: "<us"}
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6


async def test_refusal_before_streaming_is_an_http_error(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.queue_full = True
    response = await client.post("/v1/completions", json={"model": "base-model", "prompt": "a", "stream": True})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.json()["error"]["type"] == "rate_limit_error"


async def test_one_choice_refused_cancels_the_others(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.step_delay_s = 0.01
    body = {"model": "base-model", "prompt": ["a", "b" * 120], "max_tokens": 20, "stream": True}
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "max_tokens"
    assert engine.cancelled == [f"{engine.submitted[0].request_id}"]


async def test_engine_failure_mid_stream_is_an_error_event(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.fail_after = 1
    body = {"model": "base-model", "prompt": "abc", "stream": True}
    chunks = sse_payloads(await client.post("/v1/completions", json=body))
    assert chunks[0]["choices"][0]["text"] == "a"
    assert chunks[1] == {
        "error": {
            "message": "generation failed: device fell over",
            "type": "internal_error",
            "param": None,
            "code": None,
        }
    }
    assert len(chunks) == 2


async def test_engine_failure_without_streaming_is_a_500(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.fail_after = 0
    response = await client.post("/v1/completions", json={"model": "base-model", "prompt": "abc"})
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "generation failed: device fell over"


async def test_unicode_line_breaks_in_text_do_not_break_a_data_line(client: httpx.AsyncClient) -> None:
    """U+0085, U+2028 and U+2029 are left raw by JSON, and clients that split lines the way Python's `splitlines`
    does (httpx's `aiter_lines`) would cut a data line at them: they go out escaped, and the text comes back whole."""
    text = "a\x85b\u2028c\u2029d"
    body = {"model": "base-model", "prompt": text, "max_tokens": len(text), "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        lines = [line async for line in response.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    responses = {"model": "base-model", "input": text, "max_output_tokens": 16, "stream": True}
    async with client.stream("POST", "/v1/responses", json=responses) as response:
        lines = [line async for line in response.aiter_lines() if line]
    assert all(line.startswith(("event: ", "data: ")) for line in lines)
    for line in lines:
        if line.startswith("data: "):
            json.loads(line.removeprefix("data: "))
