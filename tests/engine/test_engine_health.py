"""EngineHealth's verdicts on a fake clock, and the engine thread ending every request when it dies."""

from __future__ import annotations

import asyncio

import pytest

from server.engine.factory import build_engine
from server.engine.health import EngineHealth, HealthLimits
from server.engine.sequence import FinishReason, SamplingParams
from server.errors import ServiceUnavailableError
from server.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def health(clock: Clock) -> EngineHealth:
    return EngineHealth(HealthLimits(max_step_failures=3, stall_s=10.0), clock)


def test_idle_engine_is_healthy_however_long_it_waits(health: EngineHealth, clock: Clock) -> None:
    health.going_idle()
    clock.now += 3600
    assert health.problem(thread_alive=True) is None


def test_busy_engine_without_a_finished_step_stalls(health: EngineHealth, clock: Clock) -> None:
    health.going_idle()
    clock.now += 3600
    health.woke()  # the hour asleep does not count
    clock.now += 9
    assert health.problem(thread_alive=True) is None
    clock.now += 2
    assert "finished no step for 11 s" in health.problem(thread_alive=True)
    health.step_done(failed=False)
    assert health.problem(thread_alive=True) is None


def test_repeated_step_failures_until_one_succeeds(health: EngineHealth) -> None:
    for _ in range(2):
        health.step_done(failed=True)
    assert health.problem(thread_alive=True) is None
    health.step_done(failed=True)
    assert health.problem(thread_alive=True).startswith("the last 3 engine steps failed")
    health.step_done(failed=False)
    assert health.problem(thread_alive=True) is None


def test_a_stopped_or_dead_thread(health: EngineHealth) -> None:
    assert health.problem(thread_alive=False) == "the engine thread has stopped"
    health.stop("the engine has shut down")
    assert health.problem(thread_alive=True) == "the engine has shut down"


class EngineThreadKiller(BaseException):
    """Not an Exception: nothing in the engine catches it, so it ends the engine thread."""


async def test_a_dying_engine_thread_ends_every_request_and_refuses_new_ones(tiny_model_dir) -> None:
    engine = build_engine(Settings(model=tiny_model_dir, kv_cache_bytes=2**20, block_size=4))
    try:
        params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        stream = engine.generate([5, 6, 7], params, None, "victim")
        assert not (await anext(stream)).finished

        def die():
            raise EngineThreadKiller()

        engine.core.step = die
        last = await asyncio.wait_for(anext(stream), timeout=10)
        while not last.finished:
            last = await asyncio.wait_for(anext(stream), timeout=10)
        assert last.finish_reason is FinishReason.ERROR and "victim" in last.error
        assert "EngineThreadKiller" not in last.error
        engine._thread.join(timeout=10)
        assert engine.health_problem().startswith("the engine thread stopped after an internal error")
        assert not engine.is_ready()
        with pytest.raises(ServiceUnavailableError):
            await anext(engine.generate([5, 6], params, None, "late"))
        with pytest.raises(ServiceUnavailableError):
            await engine.call(lambda core: None)
    finally:
        engine.shutdown()


async def test_a_fault_between_steps_ends_the_requests_not_the_thread(tiny_model_dir, monkeypatch) -> None:
    engine = build_engine(Settings(model=tiny_model_dir, kv_cache_bytes=2**20, block_size=4))
    try:
        record_state = engine._record_state
        calls = []

        def record_or_fail():
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("gauge trouble")
            record_state()

        monkeypatch.setattr(engine, "_record_state", record_or_fail)
        params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
        outs = [out async for out in engine.generate([5, 6, 7], params, None, "unlucky")]
        assert outs[-1].finish_reason is FinishReason.ERROR and "gauge" not in outs[-1].error
        assert engine.is_ready() and engine.health.consecutive_failures == 1
        outs = [out async for out in engine.generate([5, 6, 7], params, None, "lucky")]
        assert outs[-1].finish_reason is FinishReason.LENGTH and engine.health_problem() is None
        assert engine.core.scheduler.block_manager.num_used_blocks == 0
    finally:
        engine.shutdown()


async def test_a_request_that_cannot_be_added_gets_a_generic_error(tiny_model_dir, monkeypatch) -> None:
    engine = build_engine(Settings(model=tiny_model_dir, kv_cache_bytes=2**20, block_size=4))
    try:

        def refuse(*args):
            raise RuntimeError("internal detail")

        monkeypatch.setattr(engine.core, "add_request", refuse)
        outs = [out async for out in engine.generate([5, 6], SamplingParams(max_tokens=2), None, "refused")]
        assert outs[-1].finish_reason is FinishReason.ERROR
        assert "refused" in outs[-1].error and "internal detail" not in outs[-1].error
        assert engine.metrics.request_failures._value.get() == 1
    finally:
        engine.shutdown()
