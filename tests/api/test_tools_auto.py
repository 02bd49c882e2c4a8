"""tool_choice "auto": Hermes-style `<tool_call>` blocks read out of a free answer, whole and streamed."""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx
import openai
import pytest
from fake_engine import FakeEngine

from server.api.tool_parsers.hermes import HermesStream, parse_tool_calls


def block(name: str, arguments: object) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


CALL_A, CALL_B = block("a", {"x": 1}), block("b", {"s": "</tool"})
MALFORMED = [  # cut JSON, not an object, no name, arguments not an object
    '<tool_call>{"name": "a", "arguments": {"x": </tool_call>',
    '<tool_call>["a"]</tool_call>',
    '<tool_call>{"arguments": {}}</tool_call>',
    '<tool_call>{"name": "a", "arguments": [1]}</tool_call>',
]
PARSED = [
    ("no calls at all", "no calls at all", []),
    (CALL_A, None, [("a", {"x": 1})]),
    (f"Let me look.\n{CALL_A}\n", "Let me look.", [("a", {"x": 1})]),
    (f"{CALL_A}\n{CALL_B}", None, [("a", {"x": 1}), ("b", {"s": "</tool"})]),
    (f"before {CALL_A} between {CALL_B} after", "before  between  after", [("a", {"x": 1}), ("b", {"s": "</tool"})]),
    ('<tool_call>{"name": "a", "arguments": "{\\"x\\": 2}"}</tool_call>', None, [("a", {"x": 2})]),
    ('<tool_call>{"name": "a"}</tool_call>', None, [("a", {})]),
    *((bad, bad, []) for bad in MALFORMED),
    (f"<tool_call>oops</tool_call> {CALL_B}", "<tool_call>oops</tool_call>", [("b", {"s": "</tool"})]),
    ('ok <tool_call>{"name": "a", "arguments": {}}', 'ok <tool_call>{"name": "a", "arguments": {}}', []),
    (f"{CALL_A} <tool_ca", "<tool_ca", [("a", {"x": 1})]),
]  # fmt: skip


def named(calls: list) -> list[tuple[str, object]]:
    return [(call.function.name, json.loads(call.function.arguments)) for call in calls]


@pytest.mark.parametrize(("text", "content", "calls"), PARSED)
def test_parser_reads_calls_out_and_leaves_malformed_blocks_as_text(
    text: str, content: str | None, calls: list
) -> None:
    parsed_content, parsed_calls = parse_tool_calls(text)
    assert (parsed_content, named(parsed_calls)) == (content, calls)
    assert all(call.id.startswith("call_") and call.type == "function" for call in parsed_calls)


def reassemble(stream: HermesStream, pieces: list[str]) -> tuple[str, list[tuple[str, object]]]:
    """The content and the calls a client gets by joining the deltas of each call index."""
    content, calls = "", {}
    for i, piece in enumerate(pieces):
        text, deltas = stream.feed(piece, final=i == len(pieces) - 1)
        content += text
        for delta in deltas:
            if delta.id is not None:
                assert delta.index == len(calls) and delta.type == "function" and delta.function.arguments == ""
                calls[delta.index] = [delta.function.name, ""]
            else:
                assert delta.function.name is None
                calls[delta.index][1] += delta.function.arguments
    return content, [(name, json.loads(arguments)) for name, arguments in calls.values()]


@pytest.mark.parametrize(("text", "content", "calls"), PARSED)
@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_streamed_pieces_give_the_same_calls_and_text(text: str, content: str | None, calls: list, size: int) -> None:
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    streamed_content, streamed_calls = reassemble(HermesStream(), pieces)
    assert streamed_calls == calls
    assert (streamed_content.strip() or None if calls else streamed_content) == content


def test_text_before_a_call_streams_before_the_call_closes() -> None:
    stream = HermesStream()
    assert stream.feed("Hi <tool", final=False) == ("Hi ", [])
    assert stream.feed('_call>{"name": "a", ', final=False) == ("", [])
    text, deltas = stream.feed('"arguments": {}}</tool_call>', final=True)
    assert text == "" and [d.function.name for d in deltas] == ["a", None] and deltas[1].function.arguments == "{}"


@dataclass
class ToolTemplateEngine(FakeEngine):
    """The echo engine with a chat template that renders tools, so that its answers carry the user's blocks."""

    renders_tools: bool = True

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
        tools: list[dict] | None = None,
        template_kwargs: dict | None = None,
    ) -> list[int]:
        prompt = super().encode_chat(messages, add_generation_prompt, add_special_tokens)
        return self.encode_prompt(f"<tools {len(tools)}>") + prompt if tools and self.renders_tools else prompt


TOOLS = [{"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "b"}}]  # fmt: skip
ASK = [{"role": "user", "content": f"See {CALL_A}{CALL_B}"}]


@pytest.fixture
def engine() -> FakeEngine:
    return ToolTemplateEngine(max_model_len=1024)


@pytest.mark.parametrize("choice", [None, "auto"])
async def test_auto_returns_the_calls_whole_and_streamed(oai: openai.AsyncOpenAI, choice: str | None) -> None:
    extra = {} if choice is None else {"tool_choice": choice}
    reply = await oai.chat.completions.create(model="poet", messages=ASK, tools=TOOLS, max_tokens=400, **extra)
    (whole,) = reply.choices
    assert whole.finish_reason == "tool_calls"
    assert whole.message.content == "<tools 2><user>See <assistant>"
    expected = [("a", {"x": 1}), ("b", {"s": "</tool"})]
    assert named(whole.message.tool_calls) == expected
    stream = await oai.chat.completions.create(model="poet", messages=ASK, tools=TOOLS, max_tokens=400, stream=True,
                                               **extra)  # fmt: skip
    chunks = [chunk async for chunk in stream]
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            if delta.id:
                calls[delta.index] = [delta.function.name, delta.function.arguments]
            else:
                calls[delta.index][1] += delta.function.arguments
    assert content == whole.message.content and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert [(name, json.loads(arguments)) for name, arguments in calls.values()] == expected
    # the content before the first call is sent before any call's delta
    first_call = next(i for i, chunk in enumerate(chunks) if chunk.choices[0].delta.tool_calls)
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:first_call]) == "<tools 2><user>See "


async def test_auto_without_a_call_is_text(oai: openai.AsyncOpenAI) -> None:
    messages = [{"role": "user", "content": "no <tool_call>{bad}</tool_call>"}]
    reply = await oai.chat.completions.create(model="poet", messages=messages, tools=TOOLS, max_tokens=400)
    (choice,) = reply.choices
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    assert choice.message.content == "<tools 2><user>no <tool_call>{bad}</tool_call><assistant>"


async def test_auto_is_refused_where_the_template_ignores_tools(
    engine: ToolTemplateEngine, client: httpx.AsyncClient
) -> None:
    engine.renders_tools = False
    body = {"model": "base-model", "messages": ASK, "tools": TOOLS, "tool_choice": "auto"}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "tool_choice" and "template" in error["message"] and "tools" in error["message"]
    assert engine.submitted == []
