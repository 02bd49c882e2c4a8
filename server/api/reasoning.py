"""Reasoning read out of a model's answer (`--reasoning-parser`, vLLM's names): the `<think>...</think>` block that
opens the answer is its reasoning, the text after the block its content.

An answer with no block is all content, unless the prompt already opened one (Qwen3's templates end with
`<think>\n` when thinking is on; DeepSeek-R1's always do): then the answer starts inside the block, with or without
the start tag. A block the answer never closes (cut by max_tokens) is all reasoning. Pure text in, text out.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from server.api.tool_parsers.base import held_prefix


@dataclass(frozen=True)
class ReasoningFormat:
    """One family's reasoning block."""

    name: str
    always_open: bool = False  # the answer starts inside the block even when the prompt shows no start tag
    start: str = "<think>"
    end: str = "</think>"

    def opened_by(self, prompt_tail: str) -> bool:
        """Whether the rendered prompt, of which these are the last few tokens, ends by opening the block."""
        return prompt_tail.rstrip().endswith(self.start)

    def parse(self, text: str, opened: bool) -> tuple[str | None, str | None]:
        """The whole answer's reasoning (None when empty or absent) and content (None when a block took it all)."""
        stream = self.stream(opened)
        reasoning, content = stream.feed(text, final=True)
        if not stream.reasoned:
            return None, content
        return reasoning or None, content or None

    def stream(self, opened: bool) -> ReasoningStream:
        return ReasoningStream(self, opened or self.always_open)


REASONING_FORMATS = {format.name: format for format in (ReasoningFormat("qwen3"), ReasoningFormat("deepseek_r1", True))}


class _Part(Enum):
    OPENING = "opening"  # only whitespace or part of the start tag yet: undecided
    REASONING = "reasoning"
    CLOSED = "closed"  # the block has closed; whitespace before the content is dropped
    CONTENT = "content"


@dataclass
class ReasoningStream:
    """Splits a streamed answer into reasoning and content, agreeing with `ReasoningFormat.parse`; a tag split
    across pieces is held back until the next piece settles it."""

    format: ReasoningFormat
    opened: bool
    part: _Part = _Part.OPENING
    buffer: str = ""
    reasoned: bool = False  # the answer has a reasoning block

    def feed(self, text: str, final: bool) -> tuple[str, str]:
        """The reasoning and the content to send for the next piece of the answer (`final` for its last)."""
        self.buffer += text
        if self.part is _Part.OPENING and not self._open(final):
            return "", ""
        reasoning = ""
        if self.part is _Part.REASONING:
            end = self.buffer.find(self.format.end)
            if end < 0:
                held = 0 if final else held_prefix(self.buffer, self.format.end)
                reasoning, self.buffer = self.buffer[: len(self.buffer) - held], self.buffer[len(self.buffer) - held :]
                return reasoning, ""
            reasoning, self.buffer = self.buffer[:end], self.buffer[end + len(self.format.end) :]
            self.part = _Part.CLOSED
        if self.part is _Part.CLOSED:
            self.buffer = self.buffer.lstrip()
            if not self.buffer:
                return reasoning, ""
            self.part = _Part.CONTENT
        content, self.buffer = self.buffer, ""
        return reasoning, content

    def _open(self, final: bool) -> bool:
        """Decide whether the answer opens with a block, once the start tag is seen or ruled out."""
        opening, start = self.buffer.lstrip(), self.format.start
        if not final and len(opening) < len(start) and start.startswith(opening):
            return False
        if opening.startswith(start):
            self.buffer = opening[len(start) :]
        self.reasoned = opening.startswith(start) or self.opened
        self.part = _Part.REASONING if self.reasoned else _Part.CONTENT
        return True
