"""Response bodies and stream chunks of the OpenAI-compatible routes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from server.api.logprobs import ChatLogprobs, CompletionLogprobs
from server.api.tool_schemas import ToolCall, ToolCallDelta

FinishReasonName = Literal["stop", "length", "tool_calls"] | None


class PromptTokensDetails(BaseModel):
    """What the prompt tokens cost: `cached_tokens` of them came from the prefix cache (OpenAI's field)."""

    cached_tokens: int = 0


class Usage(BaseModel):
    """Token counts of one response: each prompt counted once, every choice's output added up."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


class CompletionChoice(BaseModel):
    """One choice of a completion, whole or as a stream increment."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReasonName = None


class CompletionResponse(BaseModel):
    """`text_completion`: the body of a non-streaming completion and of each stream chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    """The generated message of a chat choice."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None  # vLLM's field, with --reasoning-parser
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_absent_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        optional = ("reasoning_content", "tool_calls")
        return {key: value for key, value in handler(self).items() if key not in optional or value is not None}


class ChatChoice(BaseModel):
    """One choice of a non-streaming chat completion."""

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonName = None


class ChatCompletionResponse(BaseModel):
    """`chat.completion`: the body of a non-streaming chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """New content of a streamed chat choice; fields with nothing new are left out, as OpenAI does."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _drop_empty(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    """One choice's increment in a chat stream chunk."""

    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonName = None


class ChatCompletionChunk(BaseModel):
    """`chat.completion.chunk`: one event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelObject(BaseModel):
    """An entry of `GET /v1/models`: the base model, or an adapter whose `parent` is the base."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loraplex"
    parent: str | None
    root: str
    permission: list[Any] = Field(default_factory=list)
    generation_defaults: dict[str, float | int] = Field(
        default_factory=dict,
        description="Sampling values a request that leaves these fields out gets: the model's generation_config.json "
        "(--generation-config) and --override-generation-config; empty when the server's own defaults apply",
    )


class ModelList(BaseModel):
    """Body of `GET /v1/models`."""

    object: Literal["list"] = "list"
    data: list[ModelObject]


class ModelPage(ModelList):
    """Body of `GET /v1/models?after=...&limit=...`: one page, as OpenAI's paginated lists are."""

    first_id: str | None
    last_id: str | None
    has_more: bool  # more models follow `last_id`: ask again with `after=<last_id>`


class Health(BaseModel):
    """Body of a healthy `GET /health`."""

    status: Literal["ok"] = "ok"


class ErrorDetail(BaseModel):
    """What went wrong, in OpenAI's error fields."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Body of every error answer: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorDetail
