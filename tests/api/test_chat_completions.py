"""POST /v1/chat/completions, non-streaming: shape, message forms, max tokens fields."""

from __future__ import annotations

import httpx
from fake_engine import FakeEngine


async def chat(client: httpx.AsyncClient, messages: list[dict], **body: object) -> httpx.Response:
    return await client.post("/v1/chat/completions", json={"model": "poet", "messages": messages, **body})


USER_HI = [{"role": "user", "content": "hi"}]
PROMPT_HI = "<user>hi<assistant>"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, object]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_response_shape(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    response = await chat(client, USER_HI, max_tokens=4)
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "poet"
    assert isinstance(body["created"], int)
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": PROMPT_HI[:4]},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    assert body["usage"] == usage(len(PROMPT_HI), 4)
    assert engine.submitted[0].adapter == "poet"


async def test_chat_template_sees_every_message(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "q", "name": "alice"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q2"},
    ]
    await chat(client, messages)
    prompt = "".join(map(chr, engine.submitted[0].prompt_token_ids))
    assert prompt == "<system>be brief<user>q<assistant>a<user>q2<assistant>"


async def test_content_parts_are_joined(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    response = await chat(client, [{"role": "user", "content": parts}])
    assert response.status_code == 200
    assert "".join(map(chr, engine.submitted[0].prompt_token_ids)) == "<user>one\ntwo<assistant>"


async def test_default_max_tokens_is_the_rest_of_the_context(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    await chat(client, USER_HI)
    assert engine.submitted[0].params.max_tokens == engine.max_model_len - len(PROMPT_HI)


async def test_max_completion_tokens_wins_over_max_tokens(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    body = (await chat(client, USER_HI, max_tokens=9, max_completion_tokens=2)).json()
    assert engine.submitted[0].params.max_tokens == 2
    assert body["choices"][0]["message"]["content"] == "<u"


async def test_n_choices(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    body = (await chat(client, USER_HI, n=3, seed=5, max_tokens=1)).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"] == usage(len(PROMPT_HI), 3)
    assert [s.params.seed for s in engine.submitted] == [5, 6, 7]


async def test_chat_template_refusal_is_a_400(client: httpx.AsyncClient) -> None:
    response = await chat(client, [{"role": "assistant", "content": "hi"}])
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"


async def test_neutral_tool_fields_pass(client: httpx.AsyncClient) -> None:
    response = await chat(
        client, USER_HI, tools=[], tool_choice="none", logprobs=False, response_format={"type": "text"}
    )
    assert response.status_code == 200
