"""Bodies of vLLM's `POST /tokenize` and `POST /detokenize`."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, model_validator

from server.api.fields import TokenId
from server.api.limits import Bounded
from server.api.schemas import REQUEST_CONFIG, ChatMessage

MAX_DETOKENIZE_TOKENS = 1 << 20


class TokenizeRequest(BaseModel):
    """A prompt (`prompt`) or a conversation (`messages`, rendered by the chat template) to tokenize."""

    model_config = REQUEST_CONFIG

    model: str | None = Field(None, description="the base model or an adapter; omitted: the base model")
    prompt: Annotated[str, Bounded("max_text_chars")] | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1), Bounded("max_messages")] | None = None
    add_special_tokens: bool | None = Field(None, description="default: true for a prompt, false for messages")
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt and messages")
        return self


class TokenizeResponse(BaseModel):
    """The token ids, how many, the context length, and each token's text when asked."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    """Token ids to turn back into text."""

    model_config = REQUEST_CONFIG

    model: str | None = None
    tokens: list[TokenId] = Field(max_length=MAX_DETOKENIZE_TOKENS)


class DetokenizeResponse(BaseModel):
    """The decoded text."""

    prompt: str
