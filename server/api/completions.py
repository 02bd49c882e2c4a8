"""`POST /v1/completions`: one choice per (prompt, sample), whole or streamed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from server.api.generation import Generation, Indexed, collect, finish_reason_name, start
from server.api.responses import CompletionChoice, CompletionResponse, Usage
from server.api.sampling import check_fits, plan_jobs
from server.api.schemas import CompletionRequest
from server.api.streaming import EventStreamResponse

if TYPE_CHECKING:
    from server.engine.async_engine import AsyncEngine


async def create_completion(
    engine: AsyncEngine, body: CompletionRequest, request: Request
) -> CompletionResponse | EventStreamResponse:
    """Generate the completion, as one body or as a stream of `text_completion` chunks."""
    check_fits(len(body.prompt), body.n or 1, request.app.state.settings)
    adapter = engine.resolve_adapter(body.model)
    prompts = await run_in_threadpool(_tokenize, engine, body.prompt)
    generation = Generation(
        engine=engine,
        adapter=adapter,
        request_id=f"cmpl-{uuid.uuid4().hex}",
        model=body.model,
        jobs=plan_jobs(body, prompts, engine.max_model_len),
        num_prompt_tokens=sum(map(len, prompts)),
    )
    if body.stream:
        outputs = await start(request, generation)
        return EventStreamResponse(_chunks(generation, outputs, body.include_usage))
    results = await collect(request, generation)
    choices = [
        CompletionChoice(index=index, text=result.text, finish_reason=result.finish_reason)
        for index, result in sorted(results.items())
    ]
    completion_tokens = sum(result.num_output_tokens for result in results.values())
    return _envelope(generation, choices, Usage.of(generation.num_prompt_tokens, completion_tokens))


def _tokenize(engine: AsyncEngine, prompts: list[str] | list[list[int]]) -> list[list[int]]:
    return [engine.encode_prompt(prompt) if isinstance(prompt, str) else prompt for prompt in prompts]


def _envelope(generation: Generation, choices: list[CompletionChoice], usage: Usage | None) -> CompletionResponse:
    return CompletionResponse(
        id=generation.request_id, created=generation.created, model=generation.model, choices=choices, usage=usage
    )


async def _chunks(
    generation: Generation, outputs: AsyncGenerator[Indexed, None], include_usage: bool
) -> AsyncGenerator[CompletionResponse, None]:
    completion_tokens: dict[int, int] = {}
    async with aclosing(outputs):
        async for index, output in outputs:
            completion_tokens[index] = output.num_output_tokens
            if output.text or output.finished:
                choice = CompletionChoice(index=index, text=output.text, finish_reason=finish_reason_name(output))
                yield _envelope(generation, [choice], None)
    if include_usage:
        yield _envelope(generation, [], Usage.of(generation.num_prompt_tokens, sum(completion_tokens.values())))
