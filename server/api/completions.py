"""`POST /v1/completions`: one choice per (prompt, sample), whole or streamed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from server.api.generation import ChoiceResult, Generation, Indexed, collect, finish_reason_name, start
from server.api.logprobs import completion_logprobs
from server.api.responses import CompletionChoice, CompletionResponse, Usage
from server.api.sampling import check_fits, sampling_request
from server.api.schemas import CompletionRequest
from server.api.streaming import EventStreamResponse
from server.api.structured import compiled_grammar
from server.engine.logprobs import TokenLogprob
from server.engine.outputs import RequestOutput

if TYPE_CHECKING:
    from server.engine.async_engine import AsyncEngine


async def create_completion(
    engine: AsyncEngine, body: CompletionRequest, request: Request
) -> CompletionResponse | EventStreamResponse:
    """Generate the completion, as one body or as a stream of `text_completion` chunks."""
    check_fits(len(body.prompt), body.samples_per_prompt(), request.app.state.settings)
    adapter = engine.resolve_adapter(body.model)
    sampling = sampling_request(body, await compiled_grammar(engine, body))
    prompts = await run_in_threadpool(_tokenize, engine, body.prompt)
    generation = Generation(
        engine=engine,
        adapter=adapter,
        request_id=f"cmpl-{uuid.uuid4().hex}",
        model=body.model,
        jobs=engine.plan(sampling, prompts),
        num_prompt_tokens=sum(map(len, prompts)),
    )
    shaper = _Shaper(engine, body, prompts)
    if body.stream:
        outputs = await start(request, generation)
        return EventStreamResponse(_chunks(generation, outputs, body.include_usage, shaper))
    results = await collect(request, generation)
    completion_tokens = sum(result.num_output_tokens for result in results.values())  # best_of: every sample
    cached_tokens = generation.cached_tokens({index: result.num_cached_tokens for index, result in results.items()})
    best = sampling.most_likely(results, ChoiceResult.total_logprob)
    choices = [shaper.choice(index, result) for index, result in sorted(best.items())]
    return _envelope(generation, choices, Usage.of(generation.num_prompt_tokens, completion_tokens, cached_tokens))


def _tokenize(engine: AsyncEngine, prompts: list[str] | list[list[int]]) -> list[list[int]]:
    return [engine.encode_prompt(prompt) if isinstance(prompt, str) else prompt for prompt in prompts]


class _Shaper:
    """Builds each choice from its outputs: the echoed prompt first when asked, log-probabilities when asked."""

    def __init__(self, engine: AsyncEngine, body: CompletionRequest, prompts: list[list[int]]) -> None:
        self.decode = engine.decode_tokens
        self.n = body.n or 1
        self.echo = bool(body.echo)
        self.want_logprobs = body.logprobs is not None
        self.prompts = prompts
        self.texts = [p if isinstance(p, str) else engine.decode(p) for p in body.prompt] if self.echo else []
        self.offsets: dict[int, int] = {}  # choice index -> text offset of its next token, while streaming

    def choice(self, index: int, result: ChoiceResult) -> CompletionChoice:
        """A whole choice of a non-streaming response."""
        piece = self._piece(index, result.text, result.token_ids, result.logprobs, result.prompt_logprobs, first=True)
        return piece.model_copy(update={"finish_reason": result.finish_reason})

    def increment(self, index: int, output: RequestOutput) -> CompletionChoice | None:
        """A stream chunk's choice, or None when the output brings nothing to send."""
        first = index not in self.offsets
        if not (output.text or output.finished or (first and self.echo) or (self.want_logprobs and output.token_ids)):
            return None
        piece = self._piece(index, output.text, output.token_ids, output.logprobs, output.prompt_logprobs, first)
        return piece.model_copy(update={"finish_reason": finish_reason_name(output)})

    def _piece(
        self,
        index: int,
        text: str,
        token_ids: list[int],
        scored: list[TokenLogprob] | None,
        prompt_scored: list[TokenLogprob] | None,
        first: bool,
    ) -> CompletionChoice:
        ids, scores = list(token_ids), list(scored or [])
        if first and self.echo:
            prompt = index // self.n
            text = self.texts[prompt] + text
            ids, scores = self.prompts[prompt] + ids, [None, *(prompt_scored or []), *scores]
        logprobs = None
        if self.want_logprobs:
            logprobs = completion_logprobs(ids, scores, self.decode, self.offsets.get(index, 0))
            self.offsets[index] = self.offsets.get(index, 0) + sum(map(len, logprobs.tokens))
        else:
            self.offsets.setdefault(index, 0)
        return CompletionChoice(index=index, text=text, logprobs=logprobs)


def _envelope(generation: Generation, choices: list[CompletionChoice], usage: Usage | None) -> CompletionResponse:
    return CompletionResponse(
        id=generation.request_id, created=generation.created, model=generation.model, choices=choices, usage=usage
    )


async def _chunks(
    generation: Generation, outputs: AsyncGenerator[Indexed, None], include_usage: bool, shaper: _Shaper
) -> AsyncGenerator[CompletionResponse, None]:
    completion_tokens: dict[int, int] = {}
    cached_tokens: dict[int, int] = {}
    async with aclosing(outputs):
        async for index, output in outputs:
            completion_tokens[index] = output.num_output_tokens
            cached_tokens[index] = output.num_cached_tokens
            choice = shaper.increment(index, output)
            if choice is not None:
                yield _envelope(generation, [choice], None)
    if include_usage:
        usage = Usage.of(
            generation.num_prompt_tokens, sum(completion_tokens.values()), generation.cached_tokens(cached_tokens)
        )
        yield _envelope(generation, [], usage)
