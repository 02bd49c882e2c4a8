"""A client that hangs up cancels its engine requests, streaming or not, before or after the first token."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from api_helpers import HangUpCall
from fake_engine import FakeEngine
from fastapi import FastAPI

LONG = {"model": "base-model", "prompt": "ab", "max_tokens": 100, "ignore_eos": True}


async def wait_for(condition: object, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.005)):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.005)
    raise TimeoutError("condition never held")


@pytest.fixture
def slow_engine(engine: FakeEngine) -> FakeEngine:
    engine.step_delay_s = 0.02
    return engine


@pytest.mark.parametrize("n", [1, 3])
async def test_hang_up_without_streaming_cancels(
    app: FastAPI, client: httpx.AsyncClient, slow_engine: FakeEngine, n: int
) -> None:
    call = HangUpCall(app, "/v1/completions", {**LONG, "n": n})
    task = asyncio.create_task(call.run())
    await wait_for(lambda: len(slow_engine.submitted) == n)
    call.hang_up.set()
    await asyncio.wait_for(task, timeout=2)
    assert sorted(slow_engine.cancelled) == sorted(s.request_id for s in slow_engine.submitted)
    assert call.sent[0]["status"] == 499


@pytest.mark.parametrize("n", [1, 3])
async def test_hang_up_mid_stream_cancels(
    app: FastAPI, client: httpx.AsyncClient, slow_engine: FakeEngine, n: int
) -> None:
    chat = {key: value for key, value in LONG.items() if key != "prompt"}
    body = {**chat, "messages": [{"role": "user", "content": "x"}], "n": n, "stream": True}
    call = HangUpCall(app, "/v1/chat/completions", body)
    task = asyncio.create_task(call.run())
    await asyncio.wait_for(call.got_body.wait(), timeout=2)
    call.hang_up.set()
    await asyncio.wait_for(task, timeout=2)
    assert sorted(slow_engine.cancelled) == sorted(s.request_id for s in slow_engine.submitted)
    assert len(slow_engine.cancelled) == n
    assert not any(b"[DONE]" in m.get("body", b"") for m in call.sent)


async def test_hang_up_before_the_first_token_cancels(
    app: FastAPI, client: httpx.AsyncClient, slow_engine: FakeEngine
) -> None:
    slow_engine.step_delay_s = 10
    call = HangUpCall(app, "/v1/completions", {**LONG, "stream": True})
    task = asyncio.create_task(call.run())
    await wait_for(lambda: len(slow_engine.submitted) == 1)
    call.hang_up.set()
    await asyncio.wait_for(task, timeout=2)
    assert slow_engine.cancelled == [slow_engine.submitted[0].request_id]
    assert call.sent[0]["status"] == 499
