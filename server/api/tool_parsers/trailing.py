"""Formats whose calls fill the rest of the answer: from a marker on (or from the answer's very start) the text is
nothing but calls, read all at once.

Such an answer is streamed as content until its calls start; from there it is held until the answer ends and then
sent as the calls' deltas, or as content when the calls do not all read (a model's malformed call is text).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from server.api.tool_parsers.base import call_deltas, held_prefix
from server.api.tool_schemas import ToolCall, ToolCallDelta

ReadCalls = Callable[[str], list[ToolCall] | None]  # the calls in a tail, None unless it is nothing but calls


@dataclass(frozen=True)
class TrailingCallsFormat:
    """Calls that start at a marker anywhere in the answer, or at a leading marker that opens the answer."""

    name: str
    read_calls: ReadCalls
    markers: tuple[str, ...] = ()  # open the calls anywhere; the text before them is content
    leading: tuple[str, ...] = ()  # open the calls only as the answer's first text (after whitespace)

    def starts(self, text: str) -> Iterator[int]:
        """Where the calls may start: the answer's start if a leading marker opens it, then the first marker."""
        if self.opens_with(text.lstrip()):
            yield 0
        found = [position for marker in self.markers if (position := text.find(marker)) >= 0]
        if found:
            yield min(found)

    def opens_with(self, text: str) -> bool:
        return any(text.startswith(marker) for marker in self.leading)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        for start in self.starts(text):
            calls = self.read_calls(text[start:])
            if calls:
                return text[:start].strip() or None, calls
        return text, []

    def stream(self) -> TrailingCallsStream:
        return TrailingCallsStream(self)


@dataclass
class TrailingCallsStream:
    """Content until the calls start, then everything held and parsed once the answer ends."""

    format: TrailingCallsFormat
    buffer: str = ""
    at_start: bool = True  # nothing but whitespace seen, so a leading marker may still open the calls
    holding: bool = False  # the calls have started
    calls: int = 0

    def feed(self, text: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        """Content to send and the calls' deltas, for the next piece of the answer (`final` for its last)."""
        self.buffer += text
        content = "" if self.holding else self._content(final)
        if not (final and self.holding):
            return content, []
        left, calls = self.format.parse(self.buffer)
        self.buffer = ""
        if not calls:
            return content + (left or ""), []
        self.calls = len(calls)
        return content + (left or ""), [delta for index, call in enumerate(calls) for delta in call_deltas(index, call)]

    def _content(self, final: bool) -> str:
        """The content to send before the calls start; sets `holding` once they do."""
        if self.at_start:
            opening = self.buffer.lstrip()
            if not final and (not opening or any(_proper_prefix(opening, m) for m in self.format.leading)):
                return ""  # only whitespace or part of a leading marker yet: undecided
            self.at_start = False
            if self.format.opens_with(opening):
                self.holding = True
                return ""
        found = [position for marker in self.format.markers if (position := self.buffer.find(marker)) >= 0]
        if found:
            content, self.buffer, self.holding = self.buffer[: min(found)], self.buffer[min(found) :], True
            return content
        held = 0 if final else max((held_prefix(self.buffer, m) for m in self.format.markers), default=0)
        content, self.buffer = self.buffer[: len(self.buffer) - held], self.buffer[len(self.buffer) - held :]
        return content


def _proper_prefix(text: str, marker: str) -> bool:
    return len(text) < len(marker) and marker.startswith(text)
