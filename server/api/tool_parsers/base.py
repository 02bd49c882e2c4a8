"""What every tool-call format shares: the parser protocol, building a call from a model's JSON, OpenAI's deltas.

A format reads the calls a model writes into its free answer (`tool_choice: "auto"`) out of the answer's text,
whole (`parse`) or as it streams (`stream`). Formats translate text only: they hold no engine state, and whatever
they cannot read as a call stays content (a 500 is never the answer to a model's malformed call).
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from server.api.tool_schemas import FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta


class ToolCallStream(Protocol):
    """Splits a streamed answer into content to send now and tool-call deltas, agreeing with its format's `parse`."""

    calls: int  # calls sent so far

    def feed(self, text: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        """Content to send and the calls' deltas, for the next piece of the answer (`final` for its last)."""
        ...


class ToolCallFormat(Protocol):
    """One model family's way of writing tool calls into its answer."""

    name: str

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The answer's text outside its calls (None when only whitespace is left around calls) and its calls."""
        ...

    def stream(self) -> ToolCallStream:
        """A fresh incremental parser for one streamed answer."""
        ...


def make_call(value: Any, arguments_key: str = "arguments") -> ToolCall | None:
    """The call a decoded JSON value describes, or None unless it is an object with a string name and an object
    (or JSON-encoded object) under `arguments_key`; missing arguments are `{}`."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(arguments_key, {})
    if isinstance(arguments, str):  # some models send the arguments already encoded
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(function=FunctionCall(name=value["name"], arguments=json.dumps(arguments)))


def call_deltas(index: int, call: ToolCall) -> list[ToolCallDelta]:
    """A call as OpenAI streams one: its id, type and name with empty arguments, then the arguments."""
    opening = ToolCallDelta(index=index, id=call.id, type="function",
                            function=FunctionCallDelta(name=call.function.name, arguments=""))  # fmt: skip
    return [opening, ToolCallDelta(index=index, function=FunctionCallDelta(arguments=call.function.arguments))]


def held_prefix(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag` (held back until the next piece)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
