"""Request bodies of the OpenAI-compatible routes, validated the way OpenAI and vLLM clients expect."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator

from server.engine.logprobs import MAX_TOP_LOGPROBS

NOT_SUPPORTED = "not supported by this server"
MAX_STOP_STRINGS = 16
MAX_N = 128


def _as_stop_list(value: object) -> object:
    return [value] if isinstance(value, str) else value


def _is_token_ids(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)


def _is_prompt_batch(value: object) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and (all(isinstance(p, str) for p in value) or all(map(_is_token_ids, value)))
    )


def _as_prompt_list(value: object) -> list[str] | list[list[int]]:
    """Normalise the four OpenAI prompt forms to a list of prompts, one per choice index."""
    if isinstance(value, str) or _is_token_ids(value):
        prompts: list = [value]
    elif _is_prompt_batch(value):
        prompts = value
    else:
        raise ValueError("must be a string, a list of strings, a list of token ids or a list of token-id lists")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("must not be empty")
    return prompts


def _join_text_parts(value: object) -> object:
    """Chat content may be a list of `{"type": "text", "text": ...}` parts; join them like vLLM does."""
    if not isinstance(value, list):
        return value
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
        raise ValueError("content parts must be objects with type 'text' and a 'text' string")
    return "\n".join(p["text"] for p in value)


StopList = Annotated[
    list[Annotated[str, Field(min_length=1)]], BeforeValidator(_as_stop_list), Field(max_length=MAX_STOP_STRINGS)
]


class StreamOptions(BaseModel):
    """OpenAI `stream_options`."""

    include_usage: bool = False


class GenerationRequest(BaseModel):
    """Fields shared by completions and chat completions; unknown fields are ignored, as OpenAI clients send extras."""

    model_config = ConfigDict(extra="ignore")
    default_max_tokens: ClassVar[int | None] = None  # None: the rest of the context

    model: str
    n: int | None = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="-1 or 0 disables top-k")
    seed: int | None = None
    stop: StopList | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias")
    @classmethod
    def _reject_penalties(cls, value: object) -> object:
        if value:
            raise ValueError(NOT_SUPPORTED)
        return value

    @field_validator("response_format")
    @classmethod
    def _reject_structured_output(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type") != "text":
            raise ValueError(NOT_SUPPORTED)
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def wanted_logprobs(self) -> int | None:
        """How many alternatives to report per generated token; None: no log-probabilities."""
        return None

    def allows_zero_max_tokens(self) -> bool:
        """Whether max_tokens may be 0: only to score an echoed prompt."""
        return False

    def wanted_prompt_logprobs(self) -> int | None:
        """How many alternatives to report per prompt token; None: the prompt is not scored."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
    """Body of `POST /v1/completions`."""

    default_max_tokens: ClassVar[int | None] = 16  # OpenAI's default for legacy completions

    prompt: Annotated[list[str] | list[list[int]], BeforeValidator(_as_prompt_list)]
    best_of: int | None = None
    suffix: str | None = None

    # Log-probabilities and prompt scoring.
    max_tokens: int | None = Field(None, ge=0, description="0 scores the prompt without generating (needs echo)")
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("suffix")
    @classmethod
    def _reject_suffix(cls, value: object) -> object:
        if value:
            raise ValueError(NOT_SUPPORTED)
        return value

    def allows_zero_max_tokens(self) -> bool:
        return bool(self.echo)

    def wanted_logprobs(self) -> int | None:
        return self.logprobs

    def wanted_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None

    @field_validator("best_of")
    @classmethod
    def _reject_best_of(cls, value: int | None) -> int | None:
        if value is not None and value > 1:
            raise ValueError(NOT_SUPPORTED)
        return value


class ChatMessage(BaseModel):
    """One message of a chat; `name` and other extras are ignored."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Annotated[str, BeforeValidator(_join_text_parts)]


class ChatCompletionRequest(GenerationRequest):
    """Body of `POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    function_call: Any = None

    # Log-probabilities.
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("needs logprobs set to true")
        return value

    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("tools", "functions")
    @classmethod
    def _reject_chat_when_set(cls, value: object) -> object:
        if value:
            raise ValueError(NOT_SUPPORTED)
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _reject_tool_choice(cls, value: object) -> object:
        if value not in (None, "none"):
            raise ValueError(NOT_SUPPORTED)
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens
