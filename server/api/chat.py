"""`POST /v1/chat/completions`: the chat template renders the messages; one choice per sample."""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from functools import partial
from typing import TYPE_CHECKING

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from server.api.generation import ChoiceResult, Generation, Indexed, collect, finish_reason_name, start
from server.api.logprobs import Decode, chat_logprobs
from server.api.reply import ReplyReader, ReplyStream, reply_reader
from server.api.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    Usage,
)
from server.api.sampling import check_fits, sampling_request
from server.api.schemas import ChatCompletionRequest
from server.api.streaming import EventStreamResponse
from server.api.structured import compiled_grammar
from server.api.tool_parsers.base import call_deltas
from server.api.tools import (
    forced_tool_calls,
    forces_tool_call,
    parses_tool_calls,
    refuse_auto_without_template,
    template_tools,
)
from server.engine.outputs import RequestOutput

if TYPE_CHECKING:
    from server.engine.async_engine import AsyncEngine


async def create_chat_completion(
    engine: AsyncEngine, body: ChatCompletionRequest, request: Request
) -> ChatCompletionResponse | EventStreamResponse:
    """Generate the reply, as one `chat.completion` or as a stream of `chat.completion.chunk` events."""
    check_fits(1, body.samples_per_prompt(), request.app.state.settings)
    adapter = engine.resolve_adapter(body.model)
    sampling = sampling_request(body, await compiled_grammar(engine, body))
    # `name` is ignored; tool calls and tool results go to the template as they are.
    fields = {"role", "content", "tool_calls", "tool_call_id", "reasoning_content"}
    messages = [message.model_dump(include=fields, exclude_none=True) for message in body.messages]
    prompt = await _prompt(engine, body, messages)
    reader = reply_reader(request.app.state.settings, engine, body, prompt, sampling.structured is not None)
    generation = Generation(
        engine=engine,
        adapter=adapter,
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        model=body.model,
        jobs=engine.plan(sampling, [prompt]),
        num_prompt_tokens=len(prompt),
    )
    decode = engine.decode_tokens if body.logprobs else None
    calls = body if forces_tool_call(body) else None
    if body.stream:
        outputs = await start(request, generation)
        return EventStreamResponse(_chunks(generation, outputs, body.include_usage, decode, calls, reader))
    results = await collect(request, generation)
    choices = []
    for index, result in sorted(sampling.most_likely(results, ChoiceResult.total_logprob).items()):
        message = reader.message(result.text) if reader else _message(result.text, result.finish_reason, calls)
        called = bool(message.tool_calls) and (reader is not None or result.finish_reason == "stop")
        logprobs = chat_logprobs(result.logprobs, decode) if decode else None
        reason = "tool_calls" if called else result.finish_reason
        choices.append(ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=reason))
    completion_tokens = sum(result.num_output_tokens for result in results.values())
    cached_tokens = generation.cached_tokens({index: result.num_cached_tokens for index, result in results.items()})
    return ChatCompletionResponse(
        id=generation.request_id,
        created=generation.created,
        model=generation.model,
        choices=choices,
        usage=Usage.of(generation.num_prompt_tokens, completion_tokens, cached_tokens),
    )


async def _prompt(engine: AsyncEngine, body: ChatCompletionRequest, messages: list[dict]) -> list[int]:
    """The rendered conversation with its tools; "auto" is refused where the template does not render them."""
    tools, variables = template_tools(body), body.chat_template_kwargs
    prompt = await run_in_threadpool(partial(engine.encode_chat, messages, tools=tools, template_kwargs=variables))
    bare = partial(engine.encode_chat, messages, template_kwargs=variables)
    if parses_tool_calls(body) and prompt == await run_in_threadpool(bare):
        raise refuse_auto_without_template()
    return prompt


def _message(text: str, finish_reason: str | None, calls: ChatCompletionRequest | None) -> AssistantMessage:
    """The reply: text, or a forced reply's tool calls (the ones begun, when max_tokens cut it)."""
    found = [] if calls is None else forced_tool_calls(calls, text, finish_reason)
    return AssistantMessage(content=None, tool_calls=found) if found else AssistantMessage(content=text)


def _held_tool_call(
    generation: Generation, index: int, last: RequestOutput, text: str, body: ChatCompletionRequest
) -> ChatCompletionChunk:
    """A forced tool call's one chunk: its calls, whole or (cut by max_tokens) as far as generated; else its text."""
    reason = finish_reason_name(last)
    found = forced_tool_calls(body, text, reason)
    if not found:
        return _chunk(generation, [ChatChunkChoice(index=index, delta=ChatDelta(content=text), finish_reason=reason)])
    deltas = [delta for i, call in enumerate(found) for delta in call_deltas(i, call)]
    reason = "tool_calls" if reason == "stop" else reason
    return _chunk(generation, [ChatChunkChoice(index=index, delta=ChatDelta(tool_calls=deltas), finish_reason=reason)])


def _chunk(generation: Generation, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id=generation.request_id, created=generation.created, model=generation.model, choices=choices, usage=usage
    )


async def _chunks(
    generation: Generation,
    outputs: AsyncGenerator[Indexed, None],
    include_usage: bool,
    decode: Decode | None,
    calls: ChatCompletionRequest | None,
    reader: ReplyReader | None,
) -> AsyncGenerator[ChatCompletionChunk, None]:
    # As OpenAI does: each choice opens with the role and empty content, then content deltas, then the finish reason.
    completion_tokens: dict[int, int] = {}
    cached_tokens: dict[int, int] = {}
    held: dict[int, str] = {}  # a forced tool call's text, sent as whole calls once complete
    readers: dict[int, ReplyStream] = {}  # reasoning and "auto" tool calls read out as they close
    async with aclosing(outputs):
        for index in generation.indices:
            yield _chunk(generation, [ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
        async for index, output in outputs:
            completion_tokens[index] = output.num_output_tokens
            cached_tokens[index] = output.num_cached_tokens
            if calls is not None:
                held[index] = held.get(index, "") + output.text
                if output.finished:
                    yield _held_tool_call(generation, index, output, held[index], calls)
                continue
            reasoning, text, deltas, reason = "", output.text, None, finish_reason_name(output)
            if reader is not None:
                parser = readers.setdefault(index, reader.stream())
                reasoning, text, deltas = parser.feed(output.text, output.finished)
                reason = "tool_calls" if output.finished and parser.calls else reason
            if reasoning or text or deltas or output.finished or (decode and output.token_ids):
                delta = ChatDelta(content=text or None, reasoning_content=reasoning or None, tool_calls=deltas or None)
                logprobs = chat_logprobs(output.logprobs or [], decode) if decode else None
                yield _chunk(
                    generation, [ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=reason)]
                )
    if include_usage:
        usage = Usage.of(
            generation.num_prompt_tokens, sum(completion_tokens.values()), generation.cached_tokens(cached_tokens)
        )
        yield _chunk(generation, [], usage)
