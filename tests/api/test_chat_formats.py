"""Reasoning and tool-call formats through /v1/chat/completions, whole and streamed, with an engine that says a
scripted answer; and chat_template_kwargs on their way to the chat template."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from api_helpers import sse_payloads
from fake_engine import FakeEngine
from test_http_errors import assert_error

from server.engine.outputs import RequestOutput
from server.engine.sequence import SamplingParams
from server.settings import Settings

ASK = [{"role": "user", "content": "What now?"}]
TOOLS = [{"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}}]
CALL = {"name": "a", "arguments": {"x": 1}}


@dataclass
class ScriptedEngine(FakeEngine):
    """The echo engine saying `reply` whatever the prompt. Its template renders tools, and with `thinks` it ends
    the prompt by opening a `<think>` block unless `enable_thinking` is false, as Qwen3's does. `variables` holds the
    template variables of every rendering, `conversations` its messages."""

    reply: str = "Hello."
    thinks: bool = False
    max_model_len: int = 1024
    variables: list[dict | None] = field(default_factory=list)
    conversations: list[list[dict]] = field(default_factory=list)

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
        tools: list[dict] | None = None,
        template_kwargs: dict | None = None,
    ) -> list[int]:
        self.variables.append(template_kwargs)
        self.conversations.append(messages)
        prompt = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        prompt = (f"<tools {len(tools)}>" if tools else "") + prompt
        if self.thinks:
            thinking = (template_kwargs or {}).get("enable_thinking", True)
            prompt += "<think>\n" if thinking else "<think>\n\n</think>\n\n"
        return self.encode_prompt(prompt)

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        async for output in super().generate(self.encode_prompt(self.reply), params, adapter, request_id):
            yield output


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture
def settings(request: pytest.FixtureRequest) -> Settings:
    return Settings(max_request_bytes=64 * 1024, **getattr(request, "param", {}))


QWEN3 = {"reasoning_parser": "qwen3"}


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "base-model", "messages": ASK, "max_tokens": 200, **fields}


async def whole(client: httpx.AsyncClient, **fields: Any) -> tuple[dict[str, Any], str]:
    """The message (reasoning, content, calls as name and arguments) and the finish reason of one answer."""
    response = await client.post("/v1/chat/completions", json=body(**fields))
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    message, reason = choice["message"], choice["finish_reason"]
    calls = [
        (call["function"]["name"], json.loads(call["function"]["arguments"])) for call in message.get("tool_calls", [])
    ]
    return {"reasoning": message.get("reasoning_content"), "content": message["content"], "calls": calls}, reason


async def streamed(client: httpx.AsyncClient, **fields: Any) -> tuple[dict[str, Any], str, list[str]]:
    """The same, joined out of the stream's deltas, and which kind each delta carried, in order."""
    response = await client.post("/v1/chat/completions", json=body(stream=True, **fields))
    choices = [payload["choices"][0] for payload in sse_payloads(response) if payload["choices"]]
    reasoning, content, kinds, calls = "", "", [], {}
    for choice in choices:
        delta = choice["delta"]
        kinds += [kind for kind in ("reasoning_content", "content", "tool_calls") if delta.get(kind)]
        reasoning += delta.get("reasoning_content", "")
        content += delta.get("content") or ""
        for call in delta.get("tool_calls", []):
            name, arguments = calls.get(call["index"], ("", ""))
            calls[call["index"]] = (name + call["function"].get("name", ""), arguments + call["function"]["arguments"])
    message = {
        "reasoning": reasoning or None,
        "content": (content.strip() if calls else content) or None,
        "calls": [(name, json.loads(arguments)) for name, arguments in calls.values()],
    }
    return message, choices[-1]["finish_reason"], kinds


async def assert_answer(client: httpx.AsyncClient, expected: dict[str, Any], reason: str, **fields: Any) -> None:
    """Whole and streamed, the answer reads as `expected`, and its reasoning streams before anything else."""
    assert await whole(client, **fields) == (expected, reason)
    message, streamed_reason, kinds = await streamed(client, **fields)
    assert (message, streamed_reason) == ({**expected, "content": expected["content"] or None}, reason)
    reasoning_deltas = kinds.count("reasoning_content")
    assert kinds[:reasoning_deltas] == ["reasoning_content"] * reasoning_deltas


@pytest.mark.parametrize("settings", [QWEN3], indirect=True)
@pytest.mark.parametrize(
    ("reply", "thinks", "variables", "max_tokens", "expected", "reason"),
    [
        ("<think>\nplan it\n</think>\n\nThe answer.", False, None, 200, ("\nplan it\n", "The answer."), "stop"),
        ("Just text.", False, None, 200, (None, "Just text."), "stop"),
        ("<think>a long plan", False, None, 10, ("a l", None), "length"),
        ("plan</think>Answer", True, None, 200, ("plan", "Answer"), "stop"),
        ("still thinking", True, None, 5, ("still", None), "length"),
        ("Answer", True, {"enable_thinking": False}, 200, (None, "Answer"), "stop"),
    ],
)
async def test_reasoning_is_split_off_whole_and_streamed(
    client: httpx.AsyncClient,
    engine: ScriptedEngine,
    reply: str,
    thinks: bool,
    variables: dict | None,
    max_tokens: int,
    expected: tuple,
    reason: str,
) -> None:
    engine.reply, engine.thinks = reply, thinks
    extra = {} if variables is None else {"chat_template_kwargs": variables}
    answer = {"reasoning": expected[0], "content": expected[1], "calls": []}
    await assert_answer(client, answer, reason, max_tokens=max_tokens, **extra)
    assert engine.variables[-1] == variables


@pytest.mark.parametrize("settings", [QWEN3], indirect=True)
async def test_a_reply_sent_back_whole_takes_its_reasoning_to_the_template(
    oai: openai.AsyncOpenAI, engine: ScriptedEngine
) -> None:
    engine.reply = "<think>x</think>y"
    first = await oai.chat.completions.create(model="base-model", messages=ASK)
    again = [*ASK, first.choices[0].message, {"role": "user", "content": "And?"}]  # as agent loops do
    await oai.chat.completions.create(model="base-model", messages=again)
    assert engine.conversations[-1][1] == {"role": "assistant", "content": "y", "reasoning_content": "x"}


async def test_without_the_flag_a_think_block_is_content(client: httpx.AsyncClient, engine: ScriptedEngine) -> None:
    engine.reply = "<think>x</think>y"
    response = await client.post("/v1/chat/completions", json=body())
    assert response.json()["choices"][0]["message"] == {"role": "assistant", "content": "<think>x</think>y"}
    await assert_answer(client, {"reasoning": None, "content": "<think>x</think>y", "calls": []}, "stop")


@pytest.mark.parametrize("settings", [QWEN3], indirect=True)
async def test_a_call_after_the_reasoning_is_a_tool_call(client: httpx.AsyncClient, engine: ScriptedEngine) -> None:
    engine.reply = f"<think>I need a.</think>\n<tool_call>{json.dumps(CALL)}</tool_call>"
    expected = {"reasoning": "I need a.", "content": None, "calls": [("a", {"x": 1})]}
    await assert_answer(client, expected, "tool_calls", tools=TOOLS)


@pytest.mark.parametrize("settings", [QWEN3], indirect=True)
async def test_a_constrained_answer_has_no_reasoning(client: httpx.AsyncClient, engine: ScriptedEngine) -> None:
    engine.reply, engine.thinks = '{"a": 1}', True  # the prompt opens a block, but the grammar shapes the answer
    expected = {"reasoning": None, "content": '{"a": 1}', "calls": []}
    await assert_answer(client, expected, "stop", response_format={"type": "json_object"})


LLAMA_CALL = json.dumps({"name": "a", "parameters": {"x": 1}})
MISTRAL_CALL = f"[TOOL_CALLS][{json.dumps(CALL)}]"
HERMES_CALL = f"<tool_call>{json.dumps(CALL)}</tool_call>"


@pytest.mark.parametrize(
    ("settings", "template", "reply"),
    [
        ({"tool_call_parser": "llama3_json"}, None, LLAMA_CALL),
        ({}, '{{ "<|python_tag|>" }}', f"<|python_tag|>{LLAMA_CALL}"),
        ({"tool_call_parser": "mistral"}, None, MISTRAL_CALL),
        ({}, "[AVAILABLE_TOOLS][TOOL_CALLS]", MISTRAL_CALL),
        ({}, None, HERMES_CALL),
        ({"tool_call_parser": "hermes"}, "[TOOL_CALLS]", HERMES_CALL),
    ],
    indirect=["settings"],
)
async def test_each_format_reads_its_calls(
    client: httpx.AsyncClient, engine: ScriptedEngine, template: str | None, reply: str
) -> None:
    engine.chat_template, engine.reply = template, reply
    await assert_answer(
        client, {"reasoning": None, "content": None, "calls": [("a", {"x": 1})]}, "tool_calls", tools=TOOLS
    )


@pytest.mark.parametrize("reply", [LLAMA_CALL, MISTRAL_CALL])
async def test_another_formats_call_is_content(client: httpx.AsyncClient, engine: ScriptedEngine, reply: str) -> None:
    engine.reply = reply  # the default (hermes) reads only <tool_call> blocks
    await assert_answer(client, {"reasoning": None, "content": reply, "calls": []}, "stop", tools=TOOLS)


async def test_template_variables_reach_both_renderings(client: httpx.AsyncClient, engine: ScriptedEngine) -> None:
    variables = {"enable_thinking": False, "style": {"terse": True}}
    await whole(client, tools=TOOLS, chat_template_kwargs=variables)
    assert engine.variables == [variables, variables]  # with tools, and without to see that the tools rendered


@pytest.mark.parametrize(
    ("variables", "says"),
    [
        ({"tokenize": True}, "tokenize cannot be set"),
        ({"messages": [], "tools": []}, "messages, tools cannot be set"),
        ({"add_generation_prompt": False}, "add_generation_prompt"),
        ({"chat_template": "{{ 1 }}"}, "chat_template"),
        ("enable_thinking", "dictionary"),
        ([{"enable_thinking": False}], "dictionary"),
        ({f"k{i}": 1 for i in range(33)}, "32"),
        ({"long": "x" * 20_000}, "16384"),
    ],
)
async def test_bad_template_variables_are_400(
    client: httpx.AsyncClient, engine: ScriptedEngine, variables: Any, says: str
) -> None:
    response = await client.post("/v1/chat/completions", json=body(chat_template_kwargs=variables))
    error = assert_error(response, 400, "invalid_request_error", "chat_template_kwargs")
    assert says in error["message"]
    assert engine.variables == []
