"""Running a response's choices on the engine: one engine request per choice, merged, cancelled as a unit.

Every engine stream is an async generator; closing it (or cancelling the task awaiting it) cancels the request
inside the engine. Everything here makes sure each stream is closed however the response ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Coroutine
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from starlette.requests import ClientDisconnect

from server.engine.logprobs import TokenLogprob
from server.engine.outputs import RequestOutput
from server.engine.request import Job
from server.engine.sequence import FinishReason
from server.errors import LoraplexError, ServiceUnavailableError

if TYPE_CHECKING:
    from server.engine.async_engine import AsyncEngine

T = TypeVar("T")
Indexed = tuple[int, RequestOutput]
EngineStream = AsyncGenerator[RequestOutput, None]


@dataclass(frozen=True)
class Generation:
    """The engine requests behind one response (one job per choice, all on one adapter) and its envelope."""

    engine: AsyncEngine
    adapter: str | None
    request_id: str  # also the response id
    model: str  # as the client named it
    jobs: list[Job]
    num_prompt_tokens: int  # each prompt once, however many samples it has
    created: int = field(default_factory=lambda: int(time.time()))

    def streams(self) -> list[EngineStream]:
        """Create (but do not start) one engine stream per job."""
        return [
            self.engine.generate(job.prompt_token_ids, job.params, self.adapter, f"{self.request_id}-{job.index}")
            for job in self.jobs
        ]

    @property
    def indices(self) -> list[int]:
        return [job.index for job in self.jobs]

    def cached_tokens(self, per_choice: dict[int, int]) -> int:
        """Prompt tokens the prefix cache held, each prompt counted once (by its first sample) like prompt_tokens."""
        total, previous = 0, None
        for job in self.jobs:  # a prompt's samples are consecutive jobs sharing its token list
            if job.prompt_token_ids is not previous:
                total += per_choice.get(job.index, 0)
            previous = job.prompt_token_ids
        return total


@dataclass
class ChoiceResult:
    """A choice of a non-streaming response, built up from its outputs."""

    text: str = ""
    finish_reason: str | None = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of token_ids, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None  # of prompt tokens 1.., when asked for

    def total_logprob(self) -> float:
        """How likely the whole choice is, for best_of's ranking (its tokens' log-probabilities, added up)."""
        return sum(score.logprob for score in self.logprobs)


def _checked(output: RequestOutput) -> RequestOutput:
    """Pass an output through, or raise if the engine reports the request failed or was dropped."""
    if output.error is not None:
        raise LoraplexError(f"generation failed: {output.error}")
    if output.finished and output.finish_reason not in (FinishReason.STOP, FinishReason.LENGTH):
        raise ServiceUnavailableError("the request was cancelled by the server")
    return output


def finish_reason_name(output: RequestOutput) -> str | None:
    return output.finish_reason.value if output.finished and output.finish_reason else None


async def collect(request: Request, generation: Generation) -> dict[int, ChoiceResult]:
    """Run every choice to the end, or cancel all of them when the client goes away or one fails."""
    return await _until_disconnected(request, _collect(_merged(generation.streams(), generation.indices)))


async def start(request: Request, generation: Generation) -> AsyncGenerator[Indexed, None]:
    """Start every choice and wait for its first output, so that refusals become plain HTTP errors."""
    primed = await _until_disconnected(request, _prime_all(generation.streams()))
    return _merged(primed, generation.indices)


async def _until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await `work`, cancelling it and raising ClientDisconnect if the client hangs up first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnect()
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    # The body is already read, so the only message left to receive is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        continue


async def _collect(outputs: AsyncGenerator[Indexed, None]) -> dict[int, ChoiceResult]:
    results: dict[int, ChoiceResult] = {}
    async with aclosing(outputs):
        async for index, output in outputs:
            result = results.setdefault(index, ChoiceResult())
            result.text += output.text
            result.num_output_tokens = output.num_output_tokens
            result.num_cached_tokens = output.num_cached_tokens
            result.token_ids += output.token_ids
            result.logprobs += output.logprobs or []
            result.prompt_logprobs = result.prompt_logprobs or output.prompt_logprobs
            result.finish_reason = finish_reason_name(output)
    return results


async def _prime_all(streams: list[EngineStream]) -> list[EngineStream]:
    try:
        firsts = await _gather_or_cancel([anext(stream) for stream in streams])
    except BaseException:
        await asyncio.gather(*(stream.aclose() for stream in streams), return_exceptions=True)
        raise
    return [_prepend(first, stream) for first, stream in zip(firsts, streams, strict=True)]


async def _prepend(first: RequestOutput, rest: EngineStream) -> EngineStream:
    async with aclosing(rest):
        yield first
        async for output in rest:
            yield output


async def _gather_or_cancel(awaitables: list[Awaitable[T]]) -> list[T]:
    """Like asyncio.gather, but the first failure (or our own cancellation) cancels and awaits all the others."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    failure = next((task.exception() for task in tasks if not task.cancelled() and task.exception()), None)
    if failure is not None:
        raise failure
    return [task.result() for task in tasks]


async def _merged(streams: list[EngineStream], indices: list[int]) -> AsyncGenerator[Indexed, None]:
    """Interleave the outputs of several streams as they come, tagged with their choice index."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as stream:
            async for output in stream:
                yield indices[0], _checked(output)
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()
    pumps = [asyncio.ensure_future(_pump(i, s, queue)) for i, s in zip(indices, streams, strict=True)]
    try:
        running = len(pumps)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, _checked(item)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def _pump(index: int, stream: EngineStream, queue: asyncio.Queue) -> None:
    try:
        async with aclosing(stream):
            async for output in stream:
                queue.put_nowait((index, output))
    except Exception as exc:
        queue.put_nowait((index, exc))
    queue.put_nowait((index, None))
