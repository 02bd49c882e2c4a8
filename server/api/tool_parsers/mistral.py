"""`mistral`: calls after `[TOOL_CALLS]`, as a JSON array `[{"name": ..., "arguments": {...}}]` (v3 tokenizers) or
as `[TOOL_CALLS]name[ARGS]{...}` repeated (v11+); the text before the marker is content.

`[TOOL_CALLS]` and `[ARGS]` are special tokens, which this server's detokenizer leaves out of the text: an answer
that opens with the bare JSON array of calls is read as calls too. The `[ARGS]` form needs the markers in the text.
"""

from __future__ import annotations

import json
import re

from server.api.tool_parsers.base import make_call
from server.api.tool_parsers.trailing import TrailingCallsFormat
from server.api.tool_schemas import ToolCall

TOOL_CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"
_NAME = re.compile(r"[\w.-]+")


def read_calls(tail: str) -> list[ToolCall] | None:
    """The calls after the marker (or of a bare JSON array), or None unless the tail is nothing but calls."""
    text = tail.strip()
    if text.startswith(TOOL_CALLS) and ARGS in text:
        return _read_named(text)
    try:
        value = json.loads(text.removeprefix(TOOL_CALLS))
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [call for item in items if (call := make_call(item)) is not None]
    return calls if calls and len(calls) == len(items) else None


def _read_named(text: str) -> list[ToolCall] | None:
    """`[TOOL_CALLS]name[ARGS]{...}[TOOL_CALLS]name[ARGS]{...}`."""
    calls = []
    for part in text.split(TOOL_CALLS)[1:]:
        name, found, arguments = part.partition(ARGS)
        if not found or not _NAME.fullmatch(name.strip()):
            return None
        try:
            call = make_call({"name": name.strip(), "arguments": json.loads(arguments)})
        except ValueError:
            return None
        if call is None:
            return None
        calls.append(call)
    return calls or None


MISTRAL = TrailingCallsFormat(name="mistral", read_calls=read_calls, markers=(TOOL_CALLS,), leading=("[",))
