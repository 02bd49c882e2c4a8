"""A forced tool call that max_tokens cuts still comes back as `tool_calls`, arguments as generated, with
`finish_reason: "length"`: streamed or not, for a named function and for "required"."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from admin_helpers import admin_settings, running_app

from server.api.schemas import ChatCompletionRequest
from server.api.tools import forced_tool_calls

CITY = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[a-z]{1,6}$"}}, "required": ["city"]}
HOUR = {"type": "object", "properties": {"h": {"type": "integer", "minimum": 0, "maximum": 23}}, "required": ["h"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": CITY}},
         {"type": "function", "function": {"name": "get_time", "parameters": HOUR}}]  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
CALLS = [{"name": "get_weather", "arguments": {"city": "paris"}}, {"name": "get_time", "arguments": {"h": 12}}]


def request(tool_choice: object) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=ASK, tools=TOOLS, tool_choice=tool_choice)


def test_every_cut_of_a_required_array_gives_the_calls_begun() -> None:
    text = json.dumps(CALLS)
    full = [json.dumps(call["arguments"]) for call in CALLS]
    partial_seen = 0
    for size in range(len(text)):
        calls = forced_tool_calls(request("required"), text[:size], "length")
        names = [call.function.name for call in calls]
        assert names == [call["name"] for call in CALLS][: len(names)]
        assert bool(calls) == (size >= text.index('"arguments": ') + len('"arguments": '))
        for call, whole in zip(calls, full, strict=False):
            assert whole.startswith(call.function.arguments)
        partial_seen += bool(calls) and calls[-1].function.arguments != full[len(calls) - 1]
    assert partial_seen > 10


def test_a_cut_named_call_keeps_its_arguments_as_generated() -> None:
    (call,) = forced_tool_calls(request(NAMED), '{"city": "pa', "length")
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "pa')


@pytest.mark.parametrize("reason", [None, "cancelled", "error"])
def test_a_reply_that_did_not_finish_or_reach_its_limit_has_no_calls(reason: str | None) -> None:
    assert forced_tool_calls(request("required"), json.dumps(CALLS), reason) == []


def test_a_complete_reply_gives_every_call() -> None:
    calls = forced_tool_calls(request("required"), json.dumps(CALLS), "stop")
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (call["name"], call["arguments"]) for call in CALLS
    ]


@pytest.fixture
async def client(tiny_model_dir, tmp_path) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(admin_settings(tiny_model_dir, tmp_path / "store")) as (client, _):
        yield client


async def chat(client: httpx.AsyncClient, tool_choice: object, max_tokens: int, stream: bool = False) -> dict:
    """The one choice of a greedy reply (with the usage), streamed ones reassembled as a client joins their deltas."""
    body = {"model": "tiny", "messages": ASK, "tools": TOOLS, "tool_choice": tool_choice, "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}  # fmt: skip
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    if not stream:
        return {**response.json()["choices"][0], "usage": response.json()["usage"]}
    calls: list[dict] = []
    content, reason = "", None
    for line in response.text.splitlines():
        if not line.startswith("data: {"):
            continue
        (choice,) = json.loads(line.removeprefix("data: "))["choices"]
        content += choice["delta"].get("content") or ""
        reason = choice["finish_reason"] or reason
        for delta in choice["delta"].get("tool_calls") or []:
            if "id" in delta:
                calls.append({"id": delta["id"], "type": "function", "function": dict(delta["function"])})
            else:
                calls[delta["index"]]["function"]["arguments"] += delta["function"]["arguments"]
    message = {"role": "assistant", "content": content or None, **({"tool_calls": calls} if calls else {})}
    return {"message": message, "finish_reason": reason}


def json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def arguments(choice: dict) -> list[tuple[str, str]]:
    return [(call["function"]["name"], call["function"]["arguments"]) for call in choice["message"]["tool_calls"]]


@pytest.mark.parametrize("tool_choice", [NAMED, "required"])
async def test_a_forced_call_cut_by_max_tokens_is_still_a_tool_call(
    client: httpx.AsyncClient, tool_choice: object
) -> None:
    # Greedy: a reply cut at k tokens is the first k tokens of a longer one. A random model writes one call with a
    # named function, and "required" calls until max_tokens (64 bytes: one call and part of the next).
    whole = await chat(client, tool_choice, 64)
    assert whole["finish_reason"] == ("tool_calls" if tool_choice == NAMED else "length")
    complete = arguments(whole)
    cuts = 0
    for max_tokens in range(1, whole["usage"]["completion_tokens"], 3):
        choice = await chat(client, tool_choice, max_tokens)
        assert choice["finish_reason"] == "length"
        if "tool_calls" not in choice["message"]:  # "required" cut before its first call's arguments
            assert tool_choice == "required" and choice["message"]["content"]
            streamed = await chat(client, tool_choice, max_tokens, stream=True)
            assert streamed["message"]["content"] == choice["message"]["content"]
            continue
        assert choice["message"]["content"] is None
        cut = arguments(choice)
        assert [name for name, _ in cut] == [name for name, _ in complete][: len(cut)]
        assert all(whole_args.startswith(args) for (_, args), (_, whole_args) in zip(cut, complete, strict=False))
        cuts += cut != complete and not json_object(cut[-1][1])
        if max_tokens % 2:  # streamed, the same calls in the deltas
            streamed = await chat(client, tool_choice, max_tokens, stream=True)
            assert streamed["finish_reason"] == "length" and arguments(streamed) == cut
    assert cuts  # some cuts fell inside arguments, which come back incomplete
