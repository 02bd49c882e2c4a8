"""How a free chat answer becomes a message: reasoning split off first (`server.api.reasoning`), then tool calls
read out of the content (`server.api.tool_parsers`), whole or as it streams."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.api.reasoning import REASONING_FORMATS, ReasoningFormat, ReasoningStream
from server.api.responses import AssistantMessage
from server.api.schemas import ChatCompletionRequest
from server.api.tool_parsers.base import ToolCallFormat, ToolCallStream
from server.api.tool_parsers.registry import choose_tool_format
from server.api.tool_schemas import ToolCallDelta
from server.api.tools import parses_tool_calls
from server.settings import Settings

if TYPE_CHECKING:
    from server.engine.async_engine import AsyncEngine

# Enough of the rendered prompt to see whether it ends by opening a reasoning block (`<think>\n`).
PROMPT_TAIL_TOKENS = 8


@dataclass(frozen=True)
class ReplyReader:
    """The formats one request's answers are read with; either may be absent."""

    tools: ToolCallFormat | None
    reasoning: ReasoningFormat | None
    opened: bool = False  # the prompt opened a reasoning block, so the answer starts inside it

    def message(self, text: str) -> AssistantMessage:
        reasoning, content = (None, text) if self.reasoning is None else self.reasoning.parse(text, self.opened)
        calls = []
        if self.tools is not None and content is not None:
            content, calls = self.tools.parse(content)
        return AssistantMessage(content=content, reasoning_content=reasoning, tool_calls=calls or None)

    def stream(self) -> ReplyStream:
        reasoning = None if self.reasoning is None else self.reasoning.stream(self.opened)
        return ReplyStream(reasoning, None if self.tools is None else self.tools.stream())


@dataclass
class ReplyStream:
    """One streamed answer's reasoning, content and tool-call deltas, piece by piece."""

    reasoning: ReasoningStream | None
    tools: ToolCallStream | None

    @property
    def calls(self) -> int:
        return 0 if self.tools is None else self.tools.calls

    def feed(self, text: str, final: bool) -> tuple[str, str, list[ToolCallDelta]]:
        """The reasoning, content and call deltas to send for the next piece (`final` for the answer's last)."""
        reasoning, content = ("", text) if self.reasoning is None else self.reasoning.feed(text, final)
        if self.tools is None:
            return reasoning, content, []
        content, deltas = self.tools.feed(content, final)
        return reasoning, content, deltas


def reply_reader(
    settings: Settings, engine: AsyncEngine, body: ChatCompletionRequest, prompt: list[int], constrained: bool
) -> ReplyReader | None:
    """How this request's free answers are read, or None when they are plain text.

    A grammar-constrained answer (structured outputs, a forced tool call) has no reasoning block: the grammar
    shapes it from its first token.
    """
    tools = choose_tool_format(settings.tool_call_parser, engine.chat_template) if parses_tool_calls(body) else None
    reasoning_name = None if constrained else settings.reasoning_parser
    reasoning = None if reasoning_name is None else REASONING_FORMATS[reasoning_name]
    if tools is None and reasoning is None:
        return None
    opened = reasoning is not None and reasoning.opened_by(engine.decode(prompt[-PROMPT_TAIL_TOKENS:]))
    return ReplyReader(tools, reasoning, opened)
