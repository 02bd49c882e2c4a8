"""`hermes`: calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks anywhere in the answer.

The format of Hermes, Qwen2.5, Qwen3 and SmolLM3 templates. A block whose body is not such an object stays text, as
does a block the output never closes; text between blocks is content.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from server.api.tool_parsers.base import call_deltas, held_prefix, make_call
from server.api.tool_schemas import ToolCall, ToolCallDelta

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + "(.*?)" + re.escape(CLOSE), re.DOTALL)


def parse_call(body: str) -> ToolCall | None:
    """The call a block's body holds, or None when it is not a JSON object with a name and object arguments."""
    try:
        return make_call(json.loads(body))
    except ValueError:
        return None


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """The answer's text outside its calls (None when only whitespace is left around calls) and its calls."""
    calls: list[ToolCall] = []
    pieces: list[str] = []
    position = 0
    for block in _BLOCK.finditer(text):
        call = parse_call(block.group(1))
        if call is not None:
            pieces.append(text[position : block.start()])
            calls.append(call)
            position = block.end()
    if not calls:
        return text, []
    pieces.append(text[position:])
    return "".join(pieces).strip() or None, calls


@dataclass
class HermesStream:
    """Streams content until `<tool_call>` opens a block; the block is held until it closes and then sent as a
    call's deltas, or as content when it does not parse. A block still open when the answer ends is content."""

    buffer: str = ""
    in_call: bool = False
    calls: int = 0

    def feed(self, text: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        """Content to send and the calls' deltas, for the next piece of the answer (`final` for its last)."""
        self.buffer += text
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while True:
            if not self.in_call:
                start = self.buffer.find(OPEN)
                if start < 0:
                    held = 0 if final else held_prefix(self.buffer, OPEN)
                    content.append(self.buffer[: len(self.buffer) - held])
                    self.buffer = self.buffer[len(self.buffer) - held :]
                    break
                content.append(self.buffer[:start])
                self.buffer, self.in_call = self.buffer[start + len(OPEN) :], True
            end = self.buffer.find(CLOSE)
            if end < 0:
                if final:
                    content.append(OPEN + self.buffer)
                    self.buffer = ""
                break
            call = parse_call(self.buffer[:end])
            if call is None:
                content.append(OPEN + self.buffer[: end + len(CLOSE)])
            else:
                deltas.extend(call_deltas(self.calls, call))
                self.calls += 1
            self.buffer, self.in_call = self.buffer[end + len(CLOSE) :], False
        return "".join(content), deltas


@dataclass(frozen=True)
class HermesFormat:
    """`<tool_call>` blocks (Hermes, Qwen2.5, Qwen3, SmolLM3)."""

    name: str = "hermes"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        return parse_tool_calls(text)

    def stream(self) -> HermesStream:
        return HermesStream()
