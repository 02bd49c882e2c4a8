"""The `response` object of `POST /v1/responses`, its output items and the events of its stream, in OpenAI's shapes."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from server.api.fields import ServiceTier
from server.api.responses import Usage
from server.api.responses_schemas import FunctionChoice, FunctionTool, ItemStatus, ResponsesRequest, TextConfig

ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


class OutputText(BaseModel):
    """The text of an answer."""

    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    """An output item: the assistant's text."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class FunctionCallItem(BaseModel):
    """An output item: a call of one of the request's function tools; `call_id` pairs it with its output."""

    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


OutputItem = Annotated[OutputMessage | FunctionCallItem, Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    """`cached_tokens` of the input came from the prefix cache."""

    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    """No model served here reasons apart from its answer."""

    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    """Token counts of one response."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    """Why a response stopped before its end: it ran out of tokens."""

    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ResponseError(BaseModel):
    """Why a streamed response failed after it started."""

    code: Literal["server_error"] = "server_error"
    message: str


class ResponseObject(BaseModel):
    """`response`: the body of a non-streamed response, and the state a stream's lifecycle events carry."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    instructions: str | None
    output: list[OutputItem]
    max_output_tokens: int | None
    parallel_tool_calls: bool
    previous_response_id: None = None
    store: Literal[False] = False
    temperature: float | None
    top_p: float | None
    text: TextConfig
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice
    tools: list[FunctionTool]
    truncation: Literal["disabled"] = "disabled"
    metadata: dict[str, str]
    user: str | None
    service_tier: ServiceTier | None
    usage: ResponseUsage | None = None


class ResponseEvent(BaseModel):
    """One event of a streamed response; its `type` names the event, `sequence_number` counts from 0."""

    type: str
    sequence_number: int


class LifecycleEvent(ResponseEvent):
    """`response.created`, `response.in_progress` and the last event: `.completed`, `.incomplete` or `.failed`."""

    response: ResponseObject


class OutputItemEvent(ResponseEvent):
    """`response.output_item.added` (the item as it starts) and `response.output_item.done` (as it ends)."""

    output_index: int
    item: OutputItem


class ContentPartEvent(ResponseEvent):
    """`response.content_part.added` and `response.content_part.done`: a message's text part."""

    item_id: str
    output_index: int
    content_index: int = 0
    part: OutputText


class TextDeltaEvent(ResponseEvent):
    """`response.output_text.delta`: the next piece of a message's text."""

    item_id: str
    output_index: int
    content_index: int = 0
    delta: str
    logprobs: list[Any] = Field(default_factory=list)


class TextDoneEvent(ResponseEvent):
    """`response.output_text.done`: a message's whole text."""

    item_id: str
    output_index: int
    content_index: int = 0
    text: str
    logprobs: list[Any] = Field(default_factory=list)


class ArgumentsDeltaEvent(ResponseEvent):
    """`response.function_call_arguments.delta`: the next piece of a call's arguments."""

    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(ResponseEvent):
    """`response.function_call_arguments.done`: a call's whole arguments."""

    item_id: str
    output_index: int
    name: str
    arguments: str


@dataclass(frozen=True)
class ResponseEnvelope:
    """What every `response` of one request shares: its id and time (chat's, renamed) and the request's echoes."""

    body: ResponsesRequest
    id: str
    created_at: int

    @classmethod
    def of(cls, body: ResponsesRequest, chat_id: str, created: int) -> ResponseEnvelope:
        return cls(body, "resp_" + chat_id.removeprefix("chatcmpl-"), created)

    def build(self, status: ResponseStatus, output: list[OutputItem], **fields: Any) -> ResponseObject:
        """The `response` in this state; `fields` adds usage, error or incomplete details."""
        body = self.body
        return ResponseObject(
            id=self.id,
            created_at=self.created_at,
            status=status,
            model=body.model,
            instructions=body.instructions,
            output=output,
            max_output_tokens=body.max_output_tokens,
            parallel_tool_calls=body.parallel_tool_calls is not False,
            temperature=body.temperature,
            top_p=body.top_p,
            text=body.text or TextConfig(),
            tool_choice=body.tool_choice or "auto",
            tools=body.tools or [],
            metadata=body.metadata or {},
            user=body.user,
            service_tier=body.service_tier,
            **fields,
        )


def response_usage(usage: Usage) -> ResponseUsage:
    """Chat's token counts under the Responses API's names."""
    cached = InputTokensDetails(cached_tokens=usage.prompt_tokens_details.cached_tokens)
    return ResponseUsage(input_tokens=usage.prompt_tokens, input_tokens_details=cached,
                         output_tokens=usage.completion_tokens, total_tokens=usage.total_tokens)  # fmt: skip


def item_id(prefix: str) -> str:
    """A new output item's id: `msg_...` for a message, `fc_...` for a function call."""
    return f"{prefix}_{uuid.uuid4().hex}"
