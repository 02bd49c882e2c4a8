"""Reasoning blocks on text: whole answers, the same answers streamed in any split, a block the prompt opened, one
max_tokens cut, none at all; and reasoning read before tool calls."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.api.reasoning import REASONING_FORMATS
from server.api.reply import ReplyReader
from server.api.tool_parsers.registry import FORMATS

# (format, the prompt opened the block, answer, reasoning, content)
CASES = [
    ("qwen3", False, "<think>\nplan\n</think>\n\nAnswer", "\nplan\n", "Answer"),
    ("qwen3", False, "Answer only", None, "Answer only"),
    ("qwen3", False, "", None, ""),
    ("qwen3", False, "  <think>x</think> y ", "x", "y "),
    ("qwen3", False, "<think>cut off by max_tok", "cut off by max_tok", None),
    ("qwen3", False, "<think>a</thin", "a</thin", None),
    ("qwen3", False, "<think>a</think>", "a", None),
    ("qwen3", False, "<think></think>Hi", None, "Hi"),
    ("qwen3", False, "Hi <think>x</think>", None, "Hi <think>x</think>"),  # only a block that opens the answer
    ("qwen3", False, "<thin", None, "<thin"),
    ("qwen3", False, "<thinking>", None, "<thinking>"),
    ("qwen3", False, "<think>a</think>b</think>c", "a", "b</think>c"),
    ("qwen3", True, "plan</think>Answer", "plan", "Answer"),
    ("qwen3", True, "<think>plan</think>Answer", "plan", "Answer"),
    ("qwen3", True, "plan cut", "plan cut", None),
    ("qwen3", True, "", None, None),
    ("deepseek_r1", False, "plan</think>\nAnswer", "plan", "Answer"),
    ("deepseek_r1", False, "<think>plan</think>Answer", "plan", "Answer"),
    ("deepseek_r1", False, "no end", "no end", None),
]  # fmt: skip


@pytest.mark.parametrize(("name", "opened", "text", "reasoning", "content"), CASES)
def test_parse_splits_reasoning_from_content(
    name: str, opened: bool, text: str, reasoning: str | None, content: str | None
) -> None:
    assert REASONING_FORMATS[name].parse(text, opened) == (reasoning, content)


def assert_streams_like_parse(name: str, opened: bool, pieces: list[str]) -> None:
    reasoning, content = REASONING_FORMATS[name].parse("".join(pieces), opened)
    stream = REASONING_FORMATS[name].stream(opened)
    sent = [stream.feed(piece, final=i == len(pieces) - 1) for i, piece in enumerate(pieces)]
    assert "".join(part for part, _ in sent) == (reasoning or "")
    assert "".join(part for _, part in sent) == (content or "")
    first_content = next((i for i, (_, part) in enumerate(sent) if part), len(sent))
    assert not any(part for part, _ in sent[first_content + 1 :])  # no reasoning once the content has begun


@pytest.mark.parametrize(("name", "opened", "text", "reasoning", "content"), CASES)
def test_every_split_point_and_every_character_stream_like_parse(
    name: str, opened: bool, text: str, reasoning: str | None, content: str | None
) -> None:
    for cut in range(len(text) + 1):
        assert_streams_like_parse(name, opened, [text[:cut], text[cut:]])
    assert_streams_like_parse(name, opened, list(text) or [""])


@settings(max_examples=300, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8))
def test_any_chunking_streams_like_parse(case: tuple, cuts: list[int]) -> None:
    name, opened, text = case[:3]
    bounds = [0, *sorted(min(cut, len(text)) for cut in cuts), len(text)]
    assert_streams_like_parse(name, opened, [text[start:end] for start, end in itertools.pairwise(bounds)])


def test_a_tag_split_across_pieces_is_held_until_settled() -> None:
    stream = REASONING_FORMATS["qwen3"].stream(False)
    assert stream.feed("\n<thi", final=False) == ("", "")
    assert stream.feed("nk>step one</th", final=False) == ("step one", "")
    assert stream.feed("ink>\n", final=False) == ("", "")
    assert stream.feed("Done", final=True) == ("", "Done")


@pytest.mark.parametrize(
    ("name", "tail", "opened"),
    [
        ("qwen3", "<|im_start|>assistant\n<think>\n", True),
        ("qwen3", "assistant\n<think>\n\n</think>\n\n", False),  # enable_thinking: false
        ("qwen3", "<|im_start|>assistant\n", False),
        ("qwen3", "<think>\n<|im_end|>\n<|im_start|>assistant\n", False),  # a user's tag, not the prompt's
        ("deepseek_r1", "<｜Assistant｜><think>\n", True),
    ],
)
def test_the_prompt_opens_a_block_only_when_it_ends_with_the_start_tag(name: str, tail: str, opened: bool) -> None:
    assert REASONING_FORMATS[name].opened_by(tail) is opened


CALL = '<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>'


@pytest.mark.parametrize(
    ("text", "reasoning", "content", "calls"),
    [
        (f"<think>I should call a.</think>\n{CALL}", "I should call a.", None, ["a"]),
        (f"<think>maybe {CALL}?</think>No call.", f"maybe {CALL}?", "No call.", []),  # a call in thought is thought
        (f"<think>cut {CALL}", f"cut {CALL}", None, []),
    ],
)
def test_calls_are_read_from_the_content_after_the_reasoning(
    text: str, reasoning: str, content: str | None, calls: list[str]
) -> None:
    reader = ReplyReader(FORMATS["hermes"], REASONING_FORMATS["qwen3"])
    message = reader.message(text)
    assert (message.reasoning_content, message.content) == (reasoning, content)
    assert [call.function.name for call in message.tool_calls or []] == calls
    stream = reader.stream()
    sent = [stream.feed(char, final=i == len(text) - 1) for i, char in enumerate(text)]
    assert "".join(part for part, _, _ in sent) == reasoning
    assert "".join(part for _, part, _ in sent).strip() == (content or "")
    deltas = [delta for _, _, part in sent for delta in part]
    assert [delta.function.name for delta in deltas if delta.id] == calls
    assert all(json.loads(delta.function.arguments) == {"x": 1} for delta in deltas if not delta.id)
