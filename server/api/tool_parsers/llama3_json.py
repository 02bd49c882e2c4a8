"""`llama3_json`: the answer is nothing but JSON calls `{"name": ..., "parameters": {...}}`, several separated by
`;`, as Llama 3.1+ templates ask for (optionally after `<|python_tag|>`, where the detokenizer keeps it).

An answer that does not open with `{` (or the tag) is content, and so is one whose JSON does not all read as calls.
"""

from __future__ import annotations

import json

from server.api.tool_parsers.base import make_call
from server.api.tool_parsers.trailing import TrailingCallsFormat
from server.api.tool_schemas import ToolCall

PYTHON_TAG = "<|python_tag|>"
_SEPARATOR = ";"
_DECODER = json.JSONDecoder()


def read_calls(tail: str) -> list[ToolCall] | None:
    """The calls of an answer made of `;`-separated JSON objects, or None unless every part is a call."""
    text = tail.strip().removeprefix(PYTHON_TAG)
    calls: list[ToolCall] = []
    position = 0
    while True:
        position = _skip_space(text, position)
        try:
            value, position = _DECODER.raw_decode(text, position)
        except ValueError:
            return None
        # Llama's templates name the arguments "parameters"; some fine-tunes write OpenAI's "arguments".
        key = "parameters" if isinstance(value, dict) and "parameters" in value else "arguments"
        call = make_call(value, key)
        if call is None:
            return None
        calls.append(call)
        position = _skip_space(text, position)
        if position == len(text):
            return calls
        if text[position] != _SEPARATOR:
            return None
        position += 1


def _skip_space(text: str, position: int) -> int:
    return len(text) - len(text[position:].lstrip())


LLAMA3_JSON = TrailingCallsFormat(name="llama3_json", read_calls=read_calls, leading=(PYTHON_TAG, "{"))
