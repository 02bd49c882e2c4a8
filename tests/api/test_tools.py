"""Forced tool calls: the schema a reply is constrained to, the calls read back from it, and the refusals."""

from __future__ import annotations

import json

import httpx
import pytest

from server.api.schemas import ChatCompletionRequest
from server.api.tools import tool_calls, tool_schema
from server.errors import InvalidRequestError

A = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
TOOLS = [
    {"type": "function", "function": {"name": "a", "parameters": A}},
    {"type": "function", "function": {"name": "b"}},
]


def request(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS, **fields)


def test_required_generates_an_array_of_calls_each_under_its_schema() -> None:
    schema = tool_schema(request(tool_choice="required"))
    assert schema["minItems"] == 1 and "maxItems" not in schema
    assert [option["properties"]["name"] for option in schema["items"]["anyOf"]] == [{"const": "a"}, {"const": "b"}]
    assert schema["items"]["anyOf"][0]["properties"]["arguments"] == A
    assert tool_schema(request(tool_choice="required", parallel_tool_calls=False))["maxItems"] == 1
    text = json.dumps([{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}])
    calls = tool_calls(request(tool_choice="required"), text)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("a", {"x": 1}), ("b", {})]
    assert len({c.id for c in calls}) == 2


def test_a_named_function_generates_its_arguments() -> None:
    body = request(tool_choice={"type": "function", "function": {"name": "a"}})
    assert tool_schema(body) == A
    (call,) = tool_calls(body, '{"x": 5}')
    assert (call.function.name, call.function.arguments) == ("a", '{"x": 5}')


def test_none_is_free_text_and_auto_or_unknown_names_are_refused() -> None:
    assert tool_schema(request(tool_choice="none")) is None
    for choice in (None, "auto", {"type": "function", "function": {"name": "c"}}):
        with pytest.raises(InvalidRequestError) as error:
            tool_schema(request(tool_choice=choice))
        assert error.value.param == "tool_choice"


@pytest.mark.parametrize("fields", [{"response_format": {"type": "json_object"}}, {"min_tokens": 1}])
async def test_forced_calls_do_not_mix_with_other_constraints(client: httpx.AsyncClient, fields: dict) -> None:
    body = {"model": "base-model", "messages": [{"role": "user", "content": "a"}], "tools": TOOLS,
            "tool_choice": "required", **fields}  # fmt: skip
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
