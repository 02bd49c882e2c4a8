"""Request bodies of the OpenAI-compatible routes, validated the way OpenAI and vLLM clients expect."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator

from server.engine.logprobs import MAX_TOP_LOGPROBS

NOT_SUPPORTED = "not supported by this server"
MAX_STOP_STRINGS = 16
MAX_N = 128
MAX_LOGIT_BIAS = 1024
MAX_STOP_TOKEN_IDS = 64


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
    response_format: dict[str, Any] | None = None

    # Sampling controls (server.engine.penalties).
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="vLLM semantics; 1 = off")
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description="token id (as a string) -> bias added to its logit"
    )
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        bad = next((key for key in value or {} if not key.isdigit()), None)
        if bad is not None:
            raise ValueError(f"keys must be token ids, got {bad!r}")
        return value

    def token_biases(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(token), bias) for token, bias in (self.logit_bias or {}).items())

    def samples_per_prompt(self) -> int:
        """How many sequences to generate per prompt (best_of may ask for more than the n returned)."""
        return self.n or 1

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
    suffix: str | None = None

    @field_validator("suffix")
    @classmethod
    def _reject_suffix(cls, value: object) -> object:
        if value:
            raise ValueError(NOT_SUPPORTED)
        return value

    # Log-probabilities and prompt scoring.
    max_tokens: int | None = Field(None, ge=0, description="0 scores the prompt without generating (needs echo)")
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def allows_zero_max_tokens(self) -> bool:
        return bool(self.echo)

    def wanted_logprobs(self) -> int | None:
        return self.logprobs

    def wanted_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None

    # Sampling controls: best_of.
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="generate this many, return the n most likely")

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
        return self.best_of or self.n or 1


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
