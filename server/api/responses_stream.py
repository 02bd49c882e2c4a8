"""A streamed `POST /v1/responses`: chat's chunks become the Responses API's events, framed as OpenAI frames them.

A stream opens with `response.created` and `response.in_progress`, opens and closes each output item in turn (a
message: item, text part, text deltas; a function call: item, argument deltas) and ends with `response.completed`,
`response.incomplete` (cut by max_output_tokens) or `response.failed` (the generation failed after it started).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, cast

from starlette.responses import StreamingResponse
from starlette.types import Send

from server.api.responses import ChatCompletionChunk, ChatDelta, ErrorDetail, Usage
from server.api.responses_objects import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    FunctionCallItem,
    IncompleteDetails,
    LifecycleEvent,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    ResponseEnvelope,
    ResponseError,
    ResponseEvent,
    TextDeltaEvent,
    TextDoneEvent,
    item_id,
    response_usage,
)
from server.api.responses_schemas import ItemStatus, ResponsesRequest
from server.api.streaming import EventStreamResponse, sse_json

logger = logging.getLogger(__name__)


class ResponseEventStream(StreamingResponse):
    """`text/event-stream` of `event: <type>` and `data: <json>` pairs, without `[DONE]`: the last event ends it."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[ResponseEvent, None]) -> None:
        self._frames = _frames(events)
        super().__init__(self._frames, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_response(self, send: Send) -> None:
        # Closing the frames closes chat's stream, which cancels the generation if the client went away.
        async with aclosing(self._frames):
            await super().stream_response(send)


async def _frames(events: AsyncGenerator[ResponseEvent, None]) -> AsyncGenerator[str, None]:
    async with aclosing(events):
        async for event in events:
            yield f"event: {event.type}\ndata: {sse_json(event.model_dump_json(by_alias=True))}\n\n"


async def _chat_chunks(chat: EventStreamResponse) -> AsyncGenerator[ChatCompletionChunk | ErrorDetail, None]:
    """Chat's chunks read back from its events (chat's public entry point answers with them), then its error if any."""
    frames = cast(AsyncGenerator[str, None], chat.body_iterator)
    async with aclosing(frames):
        async for frame in frames:
            payload = frame.removeprefix("data: ").rstrip("\n")
            if payload == "[DONE]":
                return
            data: dict[str, Any] = json.loads(payload)
            yield ErrorDetail(**data["error"]) if "error" in data else ChatCompletionChunk.model_validate(data)


async def response_events(body: ResponsesRequest, chat: EventStreamResponse) -> AsyncGenerator[ResponseEvent, None]:
    """The events of the response that `chat` (a started chat stream asking for usage) generates."""
    writer: EventWriter | None = None
    finish_reason, usage = None, None
    chunks = _chat_chunks(chat)
    async with aclosing(chunks):
        try:
            async for chunk in chunks:
                if isinstance(chunk, ErrorDetail):
                    for event in writer.fail(chunk.message) if writer else []:
                        yield event
                    return
                if writer is None:  # chat's first chunk, sent as soon as the generation started
                    writer = EventWriter(ResponseEnvelope.of(body, chunk.id, chunk.created))
                    for event in writer.start():
                        yield event
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    for event in writer.delta(choice.delta):
                        yield event
                    finish_reason = choice.finish_reason or finish_reason
        except Exception:  # a bug here: the client learns that the response failed, the log learns why
            logger.exception("response stream failed")
            for event in writer.fail("internal server error") if writer else []:
                yield event
            return
    for event in writer.finish(finish_reason, usage) if writer else []:
        yield event


@dataclass
class OpenItem:
    """The output item being written: a message (`call_id` None) or a function call; `text` is its text or
    arguments so far."""

    id: str
    index: int
    call_id: str | None = None
    name: str = ""
    text: str = ""

    def item(self, status: ItemStatus) -> OutputItem:
        """The item as it stands: while in progress, a message has no part yet and a call no arguments."""
        done = status != "in_progress"
        if self.call_id is None:
            return OutputMessage(id=self.id, status=status, content=[OutputText(text=self.text)] if done else [])
        arguments = self.text if done else ""
        return FunctionCallItem(id=self.id, call_id=self.call_id, name=self.name, arguments=arguments, status=status)


@dataclass
class EventWriter:
    """The events of one streamed response, numbered in order; items open and close as chat's deltas come."""

    envelope: ResponseEnvelope
    output: list[OutputItem] = field(default_factory=list)
    open: OpenItem | None = None
    sequence: int = 0

    def _event(self, model: type[ResponseEvent], event_type: str, **fields: Any) -> ResponseEvent:
        event = model(type=f"response.{event_type}", sequence_number=self.sequence, **fields)
        self.sequence += 1
        return event

    def start(self) -> list[ResponseEvent]:
        response = self.envelope.build("in_progress", [])
        return [self._event(LifecycleEvent, "created", response=response),
                self._event(LifecycleEvent, "in_progress", response=response)]  # fmt: skip

    def delta(self, delta: ChatDelta) -> list[ResponseEvent]:
        """The events of one chat delta: its text, then the calls it opens and their arguments."""
        events = self._text(delta.content) if delta.content else []
        for call in delta.tool_calls or []:
            if call.id is not None:
                events += self._close("completed")
                events += self._open(OpenItem(item_id("fc"), len(self.output), call.id, call.function.name or ""))
            if call.function.arguments and self.open is not None:
                self.open.text += call.function.arguments
                events.append(self._event(ArgumentsDeltaEvent, "function_call_arguments.delta", item_id=self.open.id,
                                          output_index=self.open.index, delta=call.function.arguments))  # fmt: skip
        return events

    def finish(self, finish_reason: str | None, usage: Usage | None) -> list[ResponseEvent]:
        """Close the last item (an empty message when there was none) and end with the whole response."""
        cut = finish_reason == "length"
        events = self._open(OpenItem(item_id("msg"), 0)) if not self.output and self.open is None else []
        events += self._close("incomplete" if cut else "completed")
        status, details = ("incomplete", IncompleteDetails()) if cut else ("completed", None)
        usage_ = response_usage(usage) if usage is not None else None
        response = self.envelope.build(status, self.output, incomplete_details=details, usage=usage_)
        return [*events, self._event(LifecycleEvent, status, response=response)]

    def fail(self, message: str) -> list[ResponseEvent]:
        """End with `response.failed`, the items so far in its output."""
        output = [*self.output, self.open.item("incomplete")] if self.open else self.output
        response = self.envelope.build("failed", output, error=ResponseError(message=message))
        return [self._event(LifecycleEvent, "failed", response=response)]

    def _text(self, text: str) -> list[ResponseEvent]:
        events = [] if self.open is not None and self.open.call_id is None else self._close("completed")
        if self.open is None:
            events += self._open(OpenItem(item_id("msg"), len(self.output)))
        self.open.text += text
        events.append(self._event(TextDeltaEvent, "output_text.delta", item_id=self.open.id,
                                  output_index=self.open.index, delta=text))  # fmt: skip
        return events

    def _open(self, item: OpenItem) -> list[ResponseEvent]:
        self.open = item
        events = [self._event(OutputItemEvent, "output_item.added", output_index=item.index,
                              item=item.item("in_progress"))]  # fmt: skip
        if item.call_id is None:
            events.append(self._event(ContentPartEvent, "content_part.added", item_id=item.id,
                                      output_index=item.index, part=OutputText(text="")))  # fmt: skip
        return events

    def _close(self, status: ItemStatus) -> list[ResponseEvent]:
        item = self.open
        if item is None:
            return []
        self.open = None
        where = {"item_id": item.id, "output_index": item.index}
        if item.call_id is None:
            events = [
                self._event(TextDoneEvent, "output_text.done", text=item.text, **where),
                self._event(ContentPartEvent, "content_part.done", part=OutputText(text=item.text), **where),
            ]
        else:
            events = [self._event(ArgumentsDoneEvent, "function_call_arguments.done", name=item.name,
                                  arguments=item.text, **where)]  # fmt: skip
        done = item.item(status)
        self.output.append(done)
        return [*events, self._event(OutputItemEvent, "output_item.done", output_index=item.index, item=done)]
