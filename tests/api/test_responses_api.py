"""`POST /v1/responses` through the official `openai` client: text and streamed events, function tools round trip,
structured outputs on chat's path, tenants' scope, and the refusals that name their field."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest
from api_helpers import HangUpCall, wait_until_healthy
from fake_engine import FakeEngine
from tenant_helpers import bearer, running_client, tenant_settings, write_keys
from tool_script_engine import ToolScriptEngine

from server.api import create_app

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": CITY}
TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added"]  # fmt: skip
TEXT_END = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


async def events_of(stream: Any) -> list[Any]:
    """Every event the SDK parsed, checking that they are numbered 0, 1, 2, ..."""
    events = [event async for event in stream]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    return events


def shape(events: list[Any]) -> list[str]:
    """The event types, runs of text deltas counted as one."""
    types = [event.type for event in events]
    return [t for i, t in enumerate(types) if not (t == "response.output_text.delta" and types[i - 1] == t)]


async def test_text_answer_with_instructions_on_an_adapter(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    response = await oai.responses.create(model="poet", input="hi", instructions="be brief", metadata={"k": "v"})
    assert response.id.startswith("resp_") and response.object == "response" and response.status == "completed"
    assert response.output_text == "<system>be brief<user>hi<assistant>"
    (message,) = response.output
    assert (message.type, message.role, message.status) == ("message", "assistant", "completed")
    assert response.model == "poet" and response.metadata == {"k": "v"} and response.instructions == "be brief"
    prompt = len("<system>be brief<user>hi<assistant>")
    assert response.usage.input_tokens == prompt and response.usage.output_tokens == prompt
    assert response.usage.total_tokens == 2 * prompt and response.usage.input_tokens_details.cached_tokens == 0
    assert engine.submitted[0].adapter == "poet"


async def test_message_items_roles_and_parts_become_the_chat_conversation(
    oai: openai.AsyncOpenAI, engine: FakeEngine
) -> None:
    items = [
        {"role": "developer", "content": "d"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                        {"type": "input_text", "text": "b"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "x", "annotations": []}]},
        {"role": "user", "content": "q"},
    ]  # fmt: skip
    response = await oai.responses.create(model="base-model", input=items, max_output_tokens=60)
    assert response.output_text == "<system>d<user>a\nb<assistant>x<user>q<assistant>"
    assert engine.submitted[0].adapter is None


async def test_sampling_fields_reach_the_engine(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    response = await oai.responses.create(model="sql-writer", input="hi", temperature=0.5, top_p=0.9,
                                          max_output_tokens=3, extra_body={"seed": 7, "top_k": 4})  # fmt: skip
    params = engine.submitted[0].params
    assert (params.temperature, params.top_p, params.seed, params.top_k, params.max_tokens) == (0.5, 0.9, 7, 4, 3)
    assert (response.temperature, response.top_p, response.max_output_tokens) == (0.5, 0.9, 3)


async def test_max_output_tokens_cuts_an_incomplete_response(oai: openai.AsyncOpenAI) -> None:
    response = await oai.responses.create(model="base-model", input="hello", max_output_tokens=4)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "<use" and response.output[0].status == "incomplete"
    assert response.usage.output_tokens == 4


async def test_streamed_events_build_the_same_response(oai: openai.AsyncOpenAI) -> None:
    whole = await oai.responses.create(model="poet", input="hi")
    events = await events_of(await oai.responses.create(model="poet", input="hi", stream=True))
    assert shape(events) == [*TEXT_EVENTS, "response.output_text.delta", *TEXT_END, "response.completed"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-4].text == events[-3].part.text
    item_ids = {event.item_id for event in events if hasattr(event, "item_id")}
    assert item_ids == {events[-2].item.id}
    final = events[-1].response
    assert final.status == "completed" and final.output_text == whole.output_text
    assert final.output[0].model_dump(exclude={"id"}) == whole.output[0].model_dump(exclude={"id"})
    assert final.usage == whole.usage and final.id == events[0].response.id


async def test_streamed_cut_ends_incomplete(oai: openai.AsyncOpenAI) -> None:
    events = await events_of(await oai.responses.create(model="poet", input="hello", max_output_tokens=3, stream=True))
    assert events[-1].type == "response.incomplete"
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.output_text == "<us" and final.output[0].status == "incomplete" and final.usage.output_tokens == 3


async def test_a_failure_mid_stream_ends_with_response_failed(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    engine.fail_after = 2
    events = await events_of(await oai.responses.create(model="poet", input="abcdef", stream=True))
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed" and "device fell over" in events[-1].response.error.message


async def test_a_client_hanging_up_cancels_the_generation(app: Any, engine: FakeEngine) -> None:
    engine.step_delay_s = 0.05
    call = HangUpCall(app, "/v1/responses", {"model": "poet", "input": "a long prompt", "stream": True})
    task = asyncio.ensure_future(call.run())
    await call.got_body.wait()
    call.hang_up.set()
    await task
    assert engine.cancelled == [engine.submitted[0].request_id]


async def test_text_format_json_schema_takes_chat_s_structured_path(
    oai: openai.AsyncOpenAI, engine: FakeEngine
) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    text = {"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}}
    response = await oai.responses.create(model="poet", input="hi", text=text)
    await oai.chat.completions.create(model="poet", messages=[{"role": "user", "content": "hi"}],
                                      response_format={"type": "json_schema",
                                                       "json_schema": {"name": "thing", "schema": schema}})  # fmt: skip
    responses_spec, chat_spec = engine.compiled
    assert responses_spec == chat_spec and responses_spec.kind == "json_schema"
    assert engine.submitted[0].params.structured == engine.submitted[1].params.structured == chat_spec
    assert response.text.format.type == "json_schema" and response.text.format.name == "thing"
    await oai.responses.create(model="poet", input="hi", text={"format": {"type": "json_object"}})
    assert engine.compiled[-1].kind == "json_object"


@pytest.fixture
def tool_engine() -> ToolScriptEngine:
    return ToolScriptEngine()


@pytest.fixture
async def tool_oai(tool_engine: ToolScriptEngine, settings: Any) -> Any:
    app = create_app(settings, lambda *_: tool_engine)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            await wait_until_healthy(client)
        http_client = httpx.AsyncClient(transport=httpx.ASGITransport(app))
        async with openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http_client,
                                      max_retries=0) as oai:  # fmt: skip
            yield oai


async def test_function_call_and_its_output_round_trip(tool_oai: openai.AsyncOpenAI, tool_engine: Any) -> None:
    first = await tool_oai.responses.create(model="sql-writer", input="Paris", tools=[WEATHER], tool_choice="auto")
    (call,) = first.output
    assert (call.type, call.name, json.loads(call.arguments), call.status) == (
        "function_call", "get_weather", {"city": "Paris"}, "completed")  # fmt: skip
    assert call.call_id.startswith("call_") and call.id.startswith("fc_") and first.status == "completed"
    assert first.tools[0].name == "get_weather" and first.tool_choice == "auto"
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    items = [{"role": "user", "content": "Paris"}, *(item.model_dump(exclude_unset=True) for item in first.output)]
    second = await tool_oai.responses.create(model="sql-writer", input=[*items, result], tools=[WEATHER])
    assert second.output_text == "It is sunny there." and second.status == "completed"
    chat_call = {
        "id": call.call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": call.arguments},
    }
    assert tool_engine.conversations[-1] == [
        {"role": "user", "content": "Paris"},
        {"role": "assistant", "content": "", "tool_calls": [chat_call]},
        {"role": "tool", "content": "sunny", "tool_call_id": call.call_id},
    ]


async def test_a_streamed_function_call(tool_oai: openai.AsyncOpenAI) -> None:
    events = await events_of(await tool_oai.responses.create(model="poet", input="Oslo", tools=[WEATHER], stream=True))
    assert [event.type for event in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]  # fmt: skip
    added, delta, done, item_done, completed = events[2:]
    assert added.item.type == "function_call" and added.item.status == "in_progress" and added.item.arguments == ""
    assert json.loads(delta.delta) == json.loads(done.arguments) == {"city": "Oslo"}
    assert {delta.item_id, done.item_id} == {added.item.id} == {item_done.item.id}
    (call,) = completed.response.output
    assert call == item_done.item and call.name == "get_weather" and call.status == "completed"


async def test_tool_choice_none_answers_in_text(tool_oai: openai.AsyncOpenAI) -> None:
    response = await tool_oai.responses.create(model="poet", input="Rome", tools=[WEATHER], tool_choice="none")
    assert [item.type for item in response.output] == ["message"]


REFUSED = [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "does not store responses"),
    ({"store": True}, "store", "does not store responses"),
    ({"truncation": "auto"}, "truncation", "never cut"),
    ({"include": ["message.output_text.logprobs"]}, "include", "not supported"),
    ({"input": 5}, "input", "string or a list"),
    ({"input": []}, "input", "at least 1"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type", "message"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0].type", "input_text"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0]", "call_id"),
    ({"input": [{"role": "user", "content": "a", "call_id": "c"}]}, "input[0]", "call_id is not a field"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "function"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", "not among the tools"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format", "needs a name and a schema"),
    ({"max_output_tokens": 500}, "max_output_tokens", "plus max_output_tokens (500) is over the model's context"),
    ({"reasoning": {"effort": "low"}}, "reasoning", "unknown field"),
    ({"temperature": 3}, "temperature", "less than or equal to 2"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "param", "message"), REFUSED)
async def test_refusals_name_their_field(
    oai: openai.AsyncOpenAI, engine: FakeEngine, fields: dict, param: str, message: str
) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        await oai.responses.create(model="poet", **{"input": "hi", **fields})
    assert error.value.param == param and message in error.value.message, error.value.message
    assert engine.submitted == []


async def test_auto_tools_need_a_template_that_renders_them(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        await oai.responses.create(model="poet", input="hi", tools=[WEATHER])
    assert error.value.param == "tool_choice" and "template" in error.value.message


async def test_errors_map_to_client_exceptions(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    with pytest.raises(openai.NotFoundError):
        await oai.responses.create(model="missing", input="a")
    engine.queue_full = True
    with pytest.raises(openai.RateLimitError):
        await oai.responses.create(model="poet", input="a", stream=True)


async def test_tenants_see_only_their_scope(tmp_path: Any) -> None:
    keys = write_keys(tmp_path / "keys.toml")
    engine = FakeEngine(adapters=("acme-sql", "globex-sql"))
    async with running_client(create_app(tenant_settings(tmp_path / "keys.toml"), lambda *_: engine)) as client:
        body = {"model": "globex-sql", "input": "hi"}
        assert (await client.post("/v1/responses", json=body)).status_code == 401
        assert (await client.post("/v1/responses", json=body, headers=bearer(keys["acme"]))).status_code == 404
        allowed = await client.post("/v1/responses", json=body, headers=bearer(keys["globex"]))
        assert allowed.status_code == 200 and allowed.json()["output"][0]["content"][0]["text"] == "<user>hi<assistant>"
    assert [submitted.adapter for submitted in engine.submitted] == ["globex-sql"]
