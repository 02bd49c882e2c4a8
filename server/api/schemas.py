"""Request bodies of the OpenAI-compatible routes, validated the way OpenAI and vLLM clients expect."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from server.api.fields import (
    Count,
    Metadata,
    MinTokens,
    Seed,
    ServiceTier,
    TokenCount,
    TokenCountOrZero,
    TokenId,
    TopK,
    TopLogprobs,
    tolerated,
)
from server.api.limits import Bounded
from server.api.prompts import ChatContent, PromptList, StopList
from server.api.structured_schemas import ResponseFormat, StructuredOutputs
from server.api.template_kwargs import ChatTemplateKwargs
from server.api.tool_schemas import MAX_TOOLS, ChatTool, ToolChoice

NOT_SUPPORTED = "not supported by this server"
MAX_LOGIT_BIAS = 1024
MAX_STOP_TOKEN_IDS = 64

# Strict JSON types (no "yes" for true, no "3" for 3), no NaN or infinity, and every field declared: a field the
# server does not know is refused with a 400 naming it rather than silently ignored.
REQUEST_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


EMPTY_LIST_OR_NULL = {"anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}], "description": "not supported"}
NOT_STORED = {"enum": [False, None], "description": "false only: this server does not store completions"}
TEXT_ONLY_OR_NULL = {"anyOf": [{"type": "array", "items": {"const": "text"}, "minItems": 1, "maxItems": 1},
                               {"type": "null"}], "description": 'only ["text"]'}  # fmt: skip


class StreamOptions(BaseModel):
    """OpenAI `stream_options`."""

    model_config = REQUEST_CONFIG
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """Fields shared by completions and chat completions; a field not declared here is refused (400)."""

    model_config = REQUEST_CONFIG
    default_max_tokens: ClassVar[int | None] = None  # None: the rest of the context

    model: str
    n: Annotated[Count, Bounded("max_n")] | None = 1
    max_tokens: TokenCount | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="below 1e-5: greedy, as 0")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: TopK | None = Field(None, description="-1 or 0 disables top-k")
    seed: Seed | None = Field(None, description="sample i of n uses seed + i")
    stop: StopList | None = None
    min_tokens: MinTokens = 0
    ignore_eos: bool = False
    speculative: bool = Field(True, description="false: this request never uses speculative decoding")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="accepted and ignored")
    # OpenAI fields that change nothing in the output: accepted (within OpenAI's own bounds) and ignored.
    store: Annotated[bool | None, tolerated(schema=NOT_STORED)] = None
    metadata: Metadata | None = None
    service_tier: ServiceTier | None = Field(None, description="accepted and ignored")

    @field_validator("store")
    @classmethod
    def _reject_store(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("this server does not store completions; send false or leave it out")
        return value

    # Structured outputs (server.engine.structured).
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    # Sampling controls (server.engine.penalties).
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(  # dividing a logit by less than 0.01 can overflow to infinity
        None, ge=0.01, le=10.0, description="vLLM semantics; 1 = off"
    )
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description="token id (as a string) -> bias added to its logit"
    )
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        bad = next((key for key in value or {} if not key.isdigit()), None)
        if bad is not None:
            raise ValueError(f"keys must be token ids, got {bad!r}")
        return value

    def token_biases(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(token), bias) for token, bias in (self.logit_bias or {}).items())

    # Sampling controls: best_of.
    best_of: Annotated[Count, Bounded("max_n")] | None = Field(
        None, description="generate this many, return the n most likely"
    )

    @field_validator("best_of")
    @classmethod
    def _best_of_at_least_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n") or 1
        if value is None or value == n:
            return value
        if value < n:
            raise ValueError(f"must be at least n ({n})")
        if info.data.get("stream"):
            raise ValueError("cannot be over n when streaming")
        if info.data.get("temperature") == 0.0:
            raise ValueError("must equal n with greedy sampling (temperature 0), whose samples are all the same")
        return value

    def samples_per_prompt(self) -> int:
        """How many sequences to generate per prompt (best_of may ask for more than the n returned)."""
        return self.best_of or self.n or 1

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

    prompt: PromptList
    suffix: Annotated[str | None, tolerated("", None)] = None

    @field_validator("suffix")
    @classmethod
    def _reject_suffix(cls, value: object) -> object:
        if value:
            raise ValueError(NOT_SUPPORTED)
        return value

    # Log-probabilities and prompt scoring.
    max_tokens: TokenCountOrZero | None = Field(None, description="0 scores the prompt without generating (needs echo)")
    echo: bool | None = False
    logprobs: TopLogprobs | None = None

    def allows_zero_max_tokens(self) -> bool:
        return bool(self.echo)

    def wanted_logprobs(self) -> int | None:
        return self.logprobs

    def wanted_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None


class ChatMessage(BaseModel):
    """One message of a chat; `name` is accepted and ignored, other fields are refused."""

    model_config = REQUEST_CONFIG

    role: Literal["system", "user", "assistant", "tool"]
    content: ChatContent | None = Field(
        None, validate_default=True, description="null or left out only in an assistant message that calls tools"
    )
    name: str | None = Field(None, description="accepted and ignored")

    # Tool calls and their results, passed to the chat template.
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    # What an assistant message reasoned: --reasoning-parser returns it, and clients send the message back whole.
    reasoning_content: ChatContent | None = None

    @field_validator("content")
    @classmethod
    def _content_unless_calling_tools(cls, value: str | None, info: ValidationInfo) -> str:
        if value is None and info.data.get("role") != "assistant":
            raise ValueError("must be a string; only an assistant message that calls tools may leave it out")
        return value or ""


class ChatCompletionRequest(GenerationRequest):
    """Body of `POST /v1/chat/completions`."""

    messages: Annotated[list[ChatMessage], Field(min_length=1), Bounded("max_messages")]
    max_completion_tokens: TokenCount | None = None
    functions: Annotated[list[Any] | None, tolerated(schema=EMPTY_LIST_OR_NULL)] = None
    function_call: Annotated[Any, tolerated("none", None)] = None
    # OpenAI fields that would change the output and that the server does not implement: only their neutral values.
    prediction: Annotated[Any, tolerated(None)] = None
    audio: Annotated[Any, tolerated(None)] = None
    modalities: Annotated[list[str] | None, tolerated(schema=TEXT_ONLY_OR_NULL)] = None

    # Log-probabilities.
    logprobs: bool | None = False
    top_logprobs: TopLogprobs | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("needs logprobs set to true")
        return value

    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("functions")
    @classmethod
    def _reject_functions(cls, value: object) -> object:
        if value:
            raise ValueError(f"{NOT_SUPPORTED}; send tools")
        return value

    @field_validator("function_call")
    @classmethod
    def _reject_function_call(cls, value: object) -> object:
        if value not in (None, "none"):
            raise ValueError(f"{NOT_SUPPORTED}; send tool_choice")
        return value

    @field_validator("prediction")
    @classmethod
    def _reject_prediction(cls, value: object) -> object:
        if value is not None:
            raise ValueError(f"predicted outputs are {NOT_SUPPORTED}; leave it out")
        return value

    @field_validator("audio")
    @classmethod
    def _reject_audio(cls, value: object) -> object:
        if value is not None:
            raise ValueError(f"audio output is {NOT_SUPPORTED}, which answers in text; leave it out")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and value != ["text"]:
            raise ValueError(f'only ["text"] is supported by this server, got {value}')
        return value

    # Tools (server.api.tools).
    tools: list[ChatTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = Field(
        None, description='false: "required" makes exactly one call; "auto" returns the calls the model writes'
    )
    chat_template_kwargs: ChatTemplateKwargs | None = None  # server.api.template_kwargs

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens
