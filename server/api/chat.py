"""`POST /v1/chat/completions`: the chat template renders the messages; one choice per sample."""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from server.api.generation import Generation, Indexed, collect, finish_reason_name, start
from server.api.logprobs import Decode, chat_logprobs
from server.api.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    Usage,
)
from server.api.sampling import check_fits, plan_jobs
from server.api.schemas import ChatCompletionRequest
from server.api.streaming import EventStreamResponse
from server.api.structured import compiled_grammar

if TYPE_CHECKING:
    from server.engine.async_engine import AsyncEngine


async def create_chat_completion(
    engine: AsyncEngine, body: ChatCompletionRequest, request: Request
) -> ChatCompletionResponse | EventStreamResponse:
    """Generate the reply, as one `chat.completion` or as a stream of `chat.completion.chunk` events."""
    check_fits(1, body.samples_per_prompt(), request.app.state.settings)
    adapter = engine.resolve_adapter(body.model)
    structured = await compiled_grammar(engine, body)
    messages = [message.model_dump(include={"role", "content"}) for message in body.messages]  # name is ignored
    prompt = await run_in_threadpool(engine.encode_chat, messages)
    generation = Generation(
        engine=engine,
        adapter=adapter,
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        model=body.model,
        jobs=plan_jobs(body, [prompt], engine.max_model_len, structured),
        num_prompt_tokens=len(prompt),
    )
    decode = engine.decode_tokens if body.logprobs else None
    if body.stream:
        outputs = await start(request, generation)
        return EventStreamResponse(_chunks(generation, outputs, body.include_usage, decode))
    results = await collect(request, generation)
    choices = [
        ChatChoice(
            index=index,
            message=AssistantMessage(content=result.text),
            logprobs=chat_logprobs(result.logprobs, decode) if decode else None,
            finish_reason=result.finish_reason,
        )
        for index, result in sorted(results.items())
    ]
    completion_tokens = sum(result.num_output_tokens for result in results.values())
    cached_tokens = generation.cached_tokens({index: result.num_cached_tokens for index, result in results.items()})
    return ChatCompletionResponse(
        id=generation.request_id,
        created=generation.created,
        model=generation.model,
        choices=choices,
        usage=Usage.of(generation.num_prompt_tokens, completion_tokens, cached_tokens),
    )


def _chunk(generation: Generation, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id=generation.request_id, created=generation.created, model=generation.model, choices=choices, usage=usage
    )


async def _chunks(
    generation: Generation, outputs: AsyncGenerator[Indexed, None], include_usage: bool, decode: Decode | None
) -> AsyncGenerator[ChatCompletionChunk, None]:
    # As OpenAI does: each choice opens with the role and empty content, then content deltas, then the finish reason.
    completion_tokens: dict[int, int] = {}
    cached_tokens: dict[int, int] = {}
    async with aclosing(outputs):
        for index in generation.indices:
            yield _chunk(generation, [ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
        async for index, output in outputs:
            completion_tokens[index] = output.num_output_tokens
            cached_tokens[index] = output.num_cached_tokens
            if output.text or output.finished or (decode and output.token_ids):
                delta = ChatDelta(content=output.text or None)
                logprobs = chat_logprobs(output.logprobs or [], decode) if decode else None
                reason = finish_reason_name(output)
                yield _chunk(
                    generation, [ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=reason)]
                )
    if include_usage:
        usage = Usage.of(
            generation.num_prompt_tokens, sum(completion_tokens.values()), generation.cached_tokens(cached_tokens)
        )
        yield _chunk(generation, [], usage)
