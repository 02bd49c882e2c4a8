"""vLLM's `POST /tokenize` and `POST /detokenize`, for the base model or any adapter by name.

Adapters share the base model's tokenizer, so an adapter name only has to exist (404 otherwise; with API keys, it must
be in the caller's scope). The routes are plain `def`: FastAPI runs them in its thread pool, off the event loop, since
tokenizing a long prompt blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter

from server.api.openapi import ENGINE_ERRORS, JSON_BODY_ERRORS, error_responses
from server.api.routing import BoundedRoute
from server.api.tenancy import ScopedEngineDep
from server.api.tokenize_schemas import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.errors import InvalidRequestError, NotFoundError

if TYPE_CHECKING:
    from server.engine.async_engine import AsyncEngine

router = APIRouter(tags=["tokenizer"], route_class=BoundedRoute)
RESPONSES = error_responses(*JSON_BODY_ERRORS, *ENGINE_ERRORS, NotFoundError)


@router.post("/tokenize", responses=RESPONSES)
def tokenize(body: TokenizeRequest, engine: ScopedEngineDep) -> TokenizeResponse:
    _resolve(engine, body.model)
    if body.messages is not None:
        messages = [message.model_dump() for message in body.messages]
        tokens = engine.encode_chat(messages, body.add_generation_prompt, bool(body.add_special_tokens))
    else:
        tokens = engine.encode_prompt(body.prompt or "", body.add_special_tokens is not False)
    strs = engine.decode_tokens(tokens) if body.return_token_strs else None
    return TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens, token_strs=strs)


@router.post("/detokenize", responses=RESPONSES)
def detokenize(body: DetokenizeRequest, engine: ScopedEngineDep) -> DetokenizeResponse:
    _resolve(engine, body.model)
    bad = next((t for t in body.tokens if t >= engine.vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"tokens: token id {bad} is outside the vocabulary [0, {engine.vocab_size})",
                                  param="tokens")  # fmt: skip
    return DetokenizeResponse(prompt=engine.decode(body.tokens))


def _resolve(engine: AsyncEngine, model: str | None) -> None:
    if model is not None:
        engine.resolve_adapter(model)
