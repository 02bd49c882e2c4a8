"""One streamed completion request, timed chunk by chunk; every way it can end becomes a RequestResult."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from load_tests.workload import PlannedRequest


@dataclass
class RequestResult:
    """How one request went; times are seconds, `started` and `chunk_times` relative to the start of the run."""

    index: int
    model: str
    prompt_tokens: int
    started: float
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    latency: float | None = None
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list)  # gaps between chunks after the first
    chunk_times: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first, as vLLM's benchmark computes it."""
        if not self.ok or self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def request_body(request: PlannedRequest) -> dict[str, Any]:
    """A streamed completion whose output length is exactly `max_tokens` (EOS ignored)."""
    return {
        "model": request.model,
        "prompt": request.prompt,
        "max_tokens": request.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def send(client: httpx.AsyncClient, request: PlannedRequest, run_start: float, timeout_s: float) -> RequestResult:
    """Send `request` and time it; never raises (but for cancellation), failures are results with an error."""
    result = RequestResult(request.index, request.model, len(request.prompt), time.perf_counter() - run_start)
    try:
        await asyncio.wait_for(_stream(client, request, result, run_start), timeout_s)
    except asyncio.TimeoutError:
        result.error = f"no complete answer within {timeout_s:g} s"
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.ok = result.error is None
    return result


async def _stream(client: httpx.AsyncClient, request: PlannedRequest, result: RequestResult, run_start: float) -> None:
    start = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=request_body(request)) as response:
        if response.status_code != 200:
            await response.aread()
            result.error = f"HTTP {response.status_code}: {_message(response.text)}"
            return
        finished = done = False
        last = start
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                break
            now = time.perf_counter()
            event = json.loads(data)
            if "error" in event:
                result.error = f"stream error: {event['error'].get('message')}"
                return
            if event.get("usage"):
                result.output_tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                finished = finished or choice.get("finish_reason") is not None
                if result.ttft is None:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                result.chunk_times.append(now - run_start)
                last = now
        result.latency = time.perf_counter() - start
    if not (done and finished):
        result.error = "the stream ended without a finish reason and [DONE]"


def _message(body: str) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200]
