"""`POST /v1/responses` as a translation of chat completions: the request becomes a chat request, chat generates,
and its completion (or its chunks, `server.api.responses_stream`) becomes a `response`.

Nothing here decides how to generate: the chat template, sampling, structured outputs and tool calls are chat's,
so both routes give the same answer to the same conversation.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import pydantic
from fastapi import Request
from fastapi.exceptions import RequestValidationError

from server.api.chat import create_chat_completion
from server.api.errors import validation_error
from server.api.responses import ChatCompletionResponse
from server.api.responses_objects import (
    FunctionCallItem,
    IncompleteDetails,
    OutputItem,
    OutputMessage,
    OutputText,
    ResponseEnvelope,
    ResponseObject,
    item_id,
    response_usage,
)
from server.api.responses_schemas import ContentPart, FunctionChoice, FunctionTool, ResponsesRequest, TextConfig
from server.api.responses_stream import ResponseEventStream, response_events
from server.api.schemas import ChatCompletionRequest
from server.errors import LoraplexError

if TYPE_CHECKING:
    from server.engine.async_engine import AsyncEngine

SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "min_tokens", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "parallel_tool_calls", "user")  # fmt: skip
ROLES = {"developer": "system"}  # the one Responses role chat templates do not know
# Chat's names for the fields of a refusal, renamed to the Responses fields they came from. A message's index is
# dropped: instructions and merged calls shift chat's messages against the input items.
PARAMS = (
    (re.compile(r"^messages\b.*"), "input"),
    (re.compile(r"^max_(completion_)?tokens\b"), "max_output_tokens"),
    (re.compile(r"^response_format(\.json_schema)?"), "text.format"),
    (re.compile(r"^(tools\[\d+\])\.function"), r"\1"),
    (re.compile(r"^tool_choice\.function"), "tool_choice"),
)


async def create_response(
    engine: AsyncEngine, body: ResponsesRequest, request: Request
) -> ResponseObject | ResponseEventStream:
    """Generate the answer as one `response`, or as the stream of events that builds it."""
    chat = chat_request(body)
    try:
        completion = await create_chat_completion(engine, chat, request)
    except LoraplexError as exc:
        raise renamed(exc) from None
    if isinstance(completion, ChatCompletionResponse):
        return response_object(body, completion)
    return ResponseEventStream(response_events(body, completion))


def chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that asks for the same generation; its refusals name the Responses fields."""
    payload: dict[str, Any] = {
        "model": body.model,
        "messages": chat_messages(body),
        "max_completion_tokens": body.max_output_tokens,
        "stream": bool(body.stream),
        "stream_options": {"include_usage": True} if body.stream else None,
        "response_format": _response_format(body.text),
        "tools": [_chat_tool(tool) for tool in body.tools] if body.tools else None,
        "tool_choice": _chat_tool_choice(body.tool_choice),
        **{name: getattr(body, name) for name in SAMPLING},
    }
    given = {name: value for name, value in payload.items() if value is not None}
    try:
        # Through JSON, as chat's own route validates: the same strict rules apply to the same values.
        return ChatCompletionRequest.model_validate_json(json.dumps(given))
    except pydantic.ValidationError as exc:
        raise renamed(validation_error(RequestValidationError(exc.errors()))) from None


def chat_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The conversation as chat messages: calls join the assistant message before them, outputs become tool messages."""
    messages: list[dict[str, Any]] = []
    if body.instructions is not None:
        messages.append({"role": "system", "content": body.instructions})
    for item in body.input:
        if item.type == "message":
            messages.append({"role": ROLES.get(item.role, item.role), "content": _chat_parts(item.content)})
        elif item.type == "function_call":
            function = {"name": item.name, "arguments": item.arguments}
            call = {"id": item.call_id, "type": "function", "function": function}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _chat_parts(item.output)})
    return messages


def _chat_parts(parts: list[ContentPart] | None) -> list[dict[str, str]]:
    return [{"type": "text", "text": part.text} for part in parts or []]


def _response_format(text: TextConfig | None) -> dict[str, Any] | None:
    if text is None:
        return None
    if text.format.type != "json_schema":
        return {"type": text.format.type}
    schema = text.format.model_dump(by_alias=True, exclude={"type"}, exclude_none=True)
    return {"type": "json_schema", "json_schema": schema}


def _chat_tool(tool: FunctionTool) -> dict[str, Any]:
    return {"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}


def _chat_tool_choice(choice: str | FunctionChoice | None) -> str | dict[str, Any] | None:
    if isinstance(choice, FunctionChoice):
        return {"type": "function", "function": {"name": choice.name}}
    return choice


def renamed(error: LoraplexError) -> LoraplexError:
    """`error` with the chat field it names renamed to the Responses field it came from, in its message too."""
    if error.param is None:
        return error
    param = error.param
    for pattern, name in PARAMS:
        param = pattern.sub(name, param, count=1)
    error.message = re.sub(rf"\b{re.escape(error.param)}\b", param, error.message)
    error.param = param
    return error


def response_object(body: ResponsesRequest, completion: ChatCompletionResponse) -> ResponseObject:
    """The whole `response` of a chat completion: the message (if any text or no call), then each call. When
    max_output_tokens cut it, the last item is the one left incomplete."""
    (choice,) = completion.choices
    cut = choice.finish_reason == "length"
    calls = choice.message.tool_calls or []
    output: list[OutputItem] = []
    if choice.message.content or not calls:
        text = OutputText(text=choice.message.content or "")
        output.append(OutputMessage(id=item_id("msg"), status="completed", content=[text]))
    output += [FunctionCallItem(id=item_id("fc"), call_id=call.id, name=call.function.name,
                                arguments=call.function.arguments, status="completed") for call in calls]  # fmt: skip
    envelope, usage = ResponseEnvelope.of(body, completion.id, completion.created), response_usage(completion.usage)
    if not cut:
        return envelope.build("completed", output, usage=usage)
    output[-1].status = "incomplete"
    return envelope.build("incomplete", output, incomplete_details=IncompleteDetails(), usage=usage)
