"""What the engine streams back to callers, one increment per step per request."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.logprobs import TokenLogprob
from server.engine.sequence import FinishReason


@dataclass
class RequestOutput:
    """New tokens and text of one request since its previous output; the last one has `finished`."""

    request_id: str
    text: str  # new text; stop strings and undecodable partial characters are held back
    token_ids: list[int]  # new token ids
    num_prompt_tokens: int
    num_output_tokens: int  # total generated so far
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None  # set when the request failed inside the engine
    scheduled_time: float | None = None  # time.monotonic() when the engine first scheduled the request
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    logprobs: list[TokenLogprob] | None = None  # of `token_ids`, when the request asks for them
    prompt_logprobs: list[TokenLogprob] | None = None  # of prompt tokens 1.., in the request's first output only


def joined(pieces: list[RequestOutput]) -> RequestOutput:
    """One output for the tokens a request took in one step (speculative decoding): the last piece's state, every
    piece's tokens and text."""
    out = pieces[-1]
    if len(pieces) > 1:
        out.text = "".join(piece.text for piece in pieces)
        out.token_ids = [token for piece in pieces for token in piece.token_ids]
    return out


def engine_error(request_id: str) -> str:
    """What a client learns of a failure inside the engine: that it happened, and the id the log files it under."""
    return f"request {request_id} failed inside the engine; the server log has the details under this id"


@dataclass(frozen=True)
class ModelCard:
    """An entry of /v1/models: the base model or an adapter on it."""

    name: str
    parent: str | None  # None for the base model
    created: int  # unix seconds
    generation_defaults: dict[str, float | int] = field(default_factory=dict)  # for the fields a request leaves out
