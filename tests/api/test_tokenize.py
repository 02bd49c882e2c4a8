"""POST /tokenize and /detokenize in vLLM's shapes, per model name, with their refusals."""

from __future__ import annotations

import httpx
import pytest


async def test_tokenize_a_prompt(client: httpx.AsyncClient) -> None:
    response = await client.post("/tokenize", json={"model": "poet", "prompt": "hey", "return_token_strs": True})
    assert response.status_code == 200
    assert response.json() == {"count": 3, "max_model_len": 128, "tokens": [104, 101, 121], "token_strs": list("hey")}


async def test_tokenize_messages_with_and_without_the_generation_prompt(client: httpx.AsyncClient) -> None:
    messages = [{"role": "user", "content": "hi"}]
    body = (await client.post("/tokenize", json={"messages": messages})).json()
    assert body["tokens"] == [ord(c) for c in "<user>hi<assistant>"] and body["token_strs"] is None
    body = (await client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False})).json()
    assert body["count"] == len("<user>hi")


async def test_detokenize(client: httpx.AsyncClient) -> None:
    response = await client.post("/detokenize", json={"model": "base-model", "tokens": [104, 105]})
    assert response.status_code == 200 and response.json() == {"prompt": "hi"}


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"model": "nope", "prompt": "a"}, 404, "model"),
        ("/tokenize", {}, 400, None),
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, None),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model"),
        ("/detokenize", {"tokens": [1, -1]}, 400, "tokens[1]"),
        ("/detokenize", {"tokens": [300]}, 400, "tokens"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ],
)
async def test_refusals(client: httpx.AsyncClient, path: str, body: dict, status: int, param: str | None) -> None:
    response = await client.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
