"""response_format and structured_outputs over HTTP: what reaches the engine, and the 400s before queueing."""

from __future__ import annotations

import json

import httpx
import pytest
from fake_engine import FakeEngine

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
CLOSED = {**SCHEMA, "additionalProperties": False}  # what a schema that does not say it is compiled as
USER = [{"role": "user", "content": "hi"}]


async def chat(client: httpx.AsyncClient, **fields: object) -> httpx.Response:
    return await client.post("/v1/chat/completions", json={"model": "poet", "messages": USER, **fields})


@pytest.mark.parametrize(
    ("fields", "kind", "text"),
    [
        ({"response_format": {"type": "json_object"}}, "json_object", ""),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}, "json_schema",
         json.dumps(CLOSED)),
        ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, "json_schema", json.dumps(CLOSED)),
        ({"structured_outputs": {"json": {**SCHEMA, "additionalProperties": True}}}, "json_schema",
         json.dumps({**SCHEMA, "additionalProperties": True})),
        ({"structured_outputs": {"regex": "[ab]+"}}, "regex", "[ab]+"),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, "choice", '["yes", "no"]'),
        ({"structured_outputs": {"grammar": 'root ::= "x"'}}, "grammar", 'root ::= "x"'),
    ],
)  # fmt: skip
async def test_constraints_are_compiled_and_reach_the_engine(
    client: httpx.AsyncClient, engine: FakeEngine, fields: dict, kind: str, text: str
) -> None:
    assert (await chat(client, n=2, **fields)).status_code == 200
    assert [(s.kind, s.text) for s in engine.compiled] == [(kind, text)]  # compiled once per request
    assert all(s.params.structured == engine.compiled[0] for s in engine.submitted)


async def test_text_format_asks_for_nothing(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    response = await client.post("/v1/completions", json={"model": "base-model", "prompt": "a",
                                                          "response_format": {"type": "text"}})  # fmt: skip
    assert response.status_code == 200 and engine.compiled == [] and engine.submitted[0].params.structured is None


@pytest.mark.parametrize(
    ("fields", "param", "problem"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
         "response_format.json_schema.schema", "strin"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
        ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex", "unclosed"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "not valid JSON"),
        ({"structured_outputs": {"grammar": "root ::= nothing"}}, "structured_outputs.grammar", "nothing"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern", "unknown field"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "at least 1"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "response_format",
         "only one of"),
        ({"response_format": {"type": "json_object"}, "min_tokens": 2}, "min_tokens", "min_tokens"),
        ({"structured_outputs": {"regex": "a"}, "ignore_eos": True}, "ignore_eos", "ignore_eos"),
    ],
)  # fmt: skip
async def test_bad_constraints_are_refused_before_queueing(
    client: httpx.AsyncClient, engine: FakeEngine, fields: dict, param: str, problem: str
) -> None:
    response = await chat(client, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and problem in error["message"], error
    assert engine.submitted == []


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "f"}}])
async def test_forced_tool_arguments_generate_only_their_declared_properties(
    client: httpx.AsyncClient, engine: FakeEngine, tool_choice: object
) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": SCHEMA}}]
    assert (await chat(client, tools=tools, tool_choice=tool_choice, max_tokens=2)).status_code == 200
    compiled = json.loads(engine.compiled[0].text)
    arguments = compiled if isinstance(tool_choice, dict) else compiled["items"]["anyOf"][0]["properties"]["arguments"]
    assert arguments == CLOSED
