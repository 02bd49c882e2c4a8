"""Every tool-call format on text: whole answers, the same answers streamed in any split, malformed calls as content,
and the format `auto` picks from a chat template."""

from __future__ import annotations

import itertools
import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.api.tool_parsers.base import ToolCallStream
from server.api.tool_parsers.registry import FORMATS, choose_tool_format, detect_format

A, B = {"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {"s": "}]; </tool"}}
CALLS_AB = [("a", {"x": 1}), ("b", {"s": "}]; </tool"})]
CUT_BLOCK = '<tool_call>{"name": "a", "arguments": {"x": </tool_call>'


def hermes(call: dict) -> str:
    return f"<tool_call>{json.dumps(call)}</tool_call>"


def llama(call: dict) -> str:
    return json.dumps({"name": call["name"], "parameters": call["arguments"]})


def named(calls: list) -> list[tuple[str, object]]:
    return [(call.function.name, json.loads(call.function.arguments)) for call in calls]


# (format, answer, content, calls): what `parse` reads, and what a client joins out of the stream
CASES = [
    ("hermes", "plain text", "plain text", []),
    ("hermes", f"Let me look.\n{hermes(A)}\n{hermes(B)}", "Let me look.", CALLS_AB),
    ("hermes", f"<tool_call>\n{json.dumps(A)}\n</tool_call>", None, [("a", {"x": 1})]),  # Qwen3 puts newlines
    ("hermes", CUT_BLOCK, CUT_BLOCK, []),
    ("llama3_json", llama(A), None, [("a", {"x": 1})]),
    ("llama3_json", f"\n <|python_tag|>{llama(A)}", None, [("a", {"x": 1})]),
    ("llama3_json", f"{llama(A)}; {llama(B)}\n", None, CALLS_AB),
    ("llama3_json", f"{json.dumps(A)};{llama(B)}", None, CALLS_AB),  # OpenAI's "arguments" key is read too
    ("llama3_json", '{"name": "a", "parameters": "{\\"x\\": 2}"}', None, [("a", {"x": 2})]),
    ("llama3_json", '{"name": "a"}', None, [("a", {})]),
    ("llama3_json", "The weather is fine.", "The weather is fine.", []),
    ("llama3_json", f"Sure: {llama(A)}", f"Sure: {llama(A)}", []),  # a call must be the whole answer
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    ("llama3_json", '{"name": "a", "parameters": {"x": ', '{"name": "a", "parameters": {"x": ', []),
    ("llama3_json", '{"name": 1, "parameters": {}}', '{"name": 1, "parameters": {}}', []),
    ("llama3_json", '{"name": "a", "parameters": [1]}', '{"name": "a", "parameters": [1]}', []),
    ("llama3_json", f"{llama(A)} and more", f"{llama(A)} and more", []),
    ("llama3_json", f"{llama(A)};", f"{llama(A)};", []),
    ("llama3_json", "<|python_tag|>", "<|python_tag|>", []),
    ("llama3_json", "<|py", "<|py", []),
    ("llama3_json", "", "", []),
    ("mistral", f"[TOOL_CALLS][{json.dumps(A)}]", None, [("a", {"x": 1})]),
    ("mistral", f"[TOOL_CALLS] [{json.dumps(A)}, {json.dumps(B)}]", None, CALLS_AB),
    ("mistral", f"Let me check. [TOOL_CALLS][{json.dumps(A)}]", "Let me check.", [("a", {"x": 1})]),
    ("mistral", f"[TOOL_CALLS]{json.dumps(A)}", None, [("a", {"x": 1})]),
    ("mistral", f' [{json.dumps(A)}]', None, [("a", {"x": 1})]),  # the detokenizer left the special token out
    ("mistral", f'[TOOL_CALLS]a[ARGS]{{"x": 1}}[TOOL_CALLS]b[ARGS]{json.dumps(B["arguments"])}', None, CALLS_AB),
    ("mistral", "[1] is the source.", "[1] is the source.", []),
    ("mistral", "[1, 2]", "[1, 2]", []),
    ("mistral", "[TOOL_CALLS][]", "[TOOL_CALLS][]", []),
    ("mistral", '[TOOL_CALLS][{"name": "a", "arguments": {"x": ', '[TOOL_CALLS][{"name": "a", "arguments": {"x": ', []),
    ("mistral", "Hm [TOOL_CALLS]oops", "Hm [TOOL_CALLS]oops", []),
    ("mistral", "[TOOL_CALLS]a b[ARGS]{}", "[TOOL_CALLS]a b[ARGS]{}", []),
    ("mistral", "[TOOL_CALLS]a[ARGS]{bad", "[TOOL_CALLS]a[ARGS]{bad", []),
    ("mistral", "Not a call [TOOL_CALL", "Not a call [TOOL_CALL", []),
]  # fmt: skip


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES)
def test_parse_reads_calls_and_leaves_the_rest_as_content(
    name: str, text: str, content: str | None, calls: list
) -> None:
    parsed_content, parsed_calls = FORMATS[name].parse(text)
    assert (parsed_content, named(parsed_calls)) == (content, calls)
    assert len({call.id for call in parsed_calls}) == len(parsed_calls)


def reassemble(stream: ToolCallStream, pieces: list[str]) -> tuple[str, list[tuple[str, object]]]:
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
    assert stream.calls == len(calls)
    return content, [(name, json.loads(arguments)) for name, arguments in calls.values()]


def assert_streams_like_parse(name: str, pieces: list[str]) -> None:
    content, calls = FORMATS[name].parse("".join(pieces))
    streamed_content, streamed_calls = reassemble(FORMATS[name].stream(), pieces)
    assert streamed_calls == named(calls)
    assert (streamed_content.strip() or None if calls else streamed_content) == content


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES)
def test_every_split_point_and_every_character_stream_like_parse(
    name: str, text: str, content: str | None, calls: list
) -> None:
    for cut in range(len(text) + 1):
        assert_streams_like_parse(name, [text[:cut], text[cut:]])
    assert_streams_like_parse(name, list(text) or [""])


@settings(max_examples=300, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_any_chunking_streams_like_parse(case: tuple, cuts: list[int]) -> None:
    name, text = case[0], case[1]
    bounds = [0, *sorted(min(cut, len(text)) for cut in cuts), len(text)]
    assert_streams_like_parse(name, [text[start:end] for start, end in itertools.pairwise(bounds)])


def test_content_before_a_mistral_call_streams_before_the_calls_end() -> None:
    stream = FORMATS["mistral"].stream()
    assert stream.feed("Checking. [TOOL_", final=False) == ("Checking. ", [])
    assert stream.feed('CALLS][{"name": "a", "arguments": {}}', final=False) == ("", [])
    content, deltas = stream.feed("]", final=True)
    assert content == "" and [delta.function.name for delta in deltas] == ["a", None]


def test_a_llama_answer_is_held_only_when_it_opens_like_a_call() -> None:
    held = FORMATS["llama3_json"].stream()
    assert held.feed(' {"name": "a", ', final=False) == ("", [])
    assert [delta.function.name for delta in held.feed('"parameters": {}}', final=True)[1]] == ["a", None]
    text = FORMATS["llama3_json"].stream()
    assert text.feed(" Hello", final=False) == (" Hello", [])


QWEN = "{%- if tools %}<tools>{{ tool | tojson }}</tools> return <tool_call>{...}</tool_call>{%- endif %}"
LLAMA = '{{- "<|python_tag|>" + tool_call.name }} Respond in the format {"name": function name, "parameters": ...}'
MISTRAL = "{%- if tools %}[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS]{%- endif %}[TOOL_CALLS]{{ calls }}"
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>{% endfor %}"
)


@pytest.mark.parametrize(
    ("template", "detected"),
    [
        (QWEN, "hermes"),
        (LLAMA, "llama3_json"),
        (MISTRAL, "mistral"),
        (CHATML, None),
        (None, None),
        (QWEN + MISTRAL, None),
    ],
)
def test_the_template_names_the_format_only_when_unambiguous(template: str | None, detected: str | None) -> None:
    assert detect_format(template) == detected
    assert choose_tool_format("auto", template).name == (detected or "hermes")


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_the_flag_wins_over_the_template(name: str) -> None:
    assert choose_tool_format(name, QWEN + LLAMA + MISTRAL).name == name


def test_the_choice_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    choose_tool_format.cache_clear()
    with caplog.at_level(logging.INFO, logger="server.api.tool_parsers.registry"):
        for _ in range(3):
            choose_tool_format("auto", LLAMA)
    assert [record.getMessage() for record in caplog.records] == [
        "tool-call parser: llama3_json (the chat template's format)"
    ]
