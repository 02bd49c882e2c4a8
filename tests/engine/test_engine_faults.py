"""Fault isolation in the engine core: a request that fails inside a step fails alone, leaks nothing, and every
other request of its batch (other adapters, the base model, greedy and seeded sampling) gives a clean run's output."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from server.adapters.registry import AdapterRegistry
from server.engine.factory import build_core
from server.engine.llm_engine import LLMEngine
from server.engine.sequence import FinishReason, SamplingParams, Sequence
from server.metrics import Metrics
from server.settings import Settings
from tests.helpers import make_fault_store

GREEDY = SamplingParams(max_tokens=8, min_tokens=8, temperature=0.0)
SEEDED = SamplingParams(max_tokens=8, min_tokens=8, temperature=0.9, top_k=40, seed=11)
WITH_LOGPROBS = SamplingParams(max_tokens=8, min_tokens=8, temperature=0.0, logprobs=2)


@dataclass(frozen=True)
class Job:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    adapter: str | None


NORMAL = [
    Job("base-greedy", [5, 6, 7, 8, 9, 10, 11], GREEDY, None),
    Job("a-greedy", [12, 13, 14], GREEDY, "a"),
    Job("b-seeded", [15, 16, 17, 18, 19], SEEDED, "b"),
    Job("a-seeded", [20, 21, 22, 23, 24, 25, 26, 27, 28], SEEDED, "a"),
    Job("b-logprobs", [29, 28, 27], WITH_LOGPROBS, "b"),
]


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory):
    return make_fault_store(tiny_model_dir, tmp_path_factory.mktemp("fault-store"))


REGISTRIES: dict[int, AdapterRegistry] = {}  # id(core) -> the adapter registry built with it, for `run`


@pytest.fixture
def core(tiny_model_dir, store) -> LLMEngine:
    settings = Settings(model=tiny_model_dir, adapters_store=store, kv_cache_bytes=2**20, block_size=4, max_loras=4)
    engine, registry, _ = build_core(settings, Metrics(10, 4))
    REGISTRIES[id(engine)] = registry
    yield engine
    registry.shutdown()
    del REGISTRIES[id(engine)]


Hook = Callable[[int, LLMEngine], None]


def run(core: LLMEngine, jobs: list[Job], hook: Hook | None = None) -> dict[str, list]:
    """Add every job, then step until the engine is idle; the outputs of each request. Adapter holds released."""
    registry = REGISTRIES[id(core)]
    keys = {job.request_id: asyncio.run(registry.acquire(job.adapter)) if job.adapter else None for job in jobs}
    outputs: dict[str, list] = {}
    for job in jobs:
        try:
            core.add_request(job.request_id, job.prompt, job.params, keys[job.request_id])
        except Exception as exc:
            outputs[job.request_id] = [exc]
    for step in range(200):
        if not core.has_work:
            break
        if hook is not None:
            hook(step, core)
        for out in core.step():
            outputs.setdefault(out.request_id, []).append(out)
    for key in keys.values():
        if key is not None:
            registry.release(key)
    return outputs


def summary(outputs: list) -> tuple[list[int], str, FinishReason | None, list]:
    logprobs = [lp.token_id for o in outputs for lp in o.logprobs or ()]
    return (
        [t for o in outputs for t in o.token_ids],
        "".join(o.text for o in outputs),
        outputs[-1].finish_reason,
        logprobs,
    )


def assert_clean(core: LLMEngine) -> None:
    """Nothing left: no request, no sequence, every KV block free, no device slot held."""
    blocks = core.scheduler.block_manager
    assert not core.requests and not core.scheduler.has_work
    assert blocks.num_free_blocks == blocks.num_blocks
    assert core.adapters.slot_users() == 0


def assert_failed_alone(outputs: dict[str, list], clean: dict[str, list], bad: str) -> None:
    last = outputs[bad][-1]
    assert last.finished and last.finish_reason is FinishReason.ERROR
    assert bad in last.error and "Error" not in last.error and "Traceback" not in last.error
    for job in NORMAL:
        assert summary(outputs[job.request_id]) == summary(clean[job.request_id]), job.request_id
        assert outputs[job.request_id][-1].error is None


def _on_step(n: int, action: Callable[[LLMEngine], None]) -> Hook:
    def hook(step: int, core: LLMEngine) -> None:
        if step == n:
            action(core)

    return hook


def _break_generator(core: LLMEngine) -> None:
    core.requests["bad"].generator = "not a generator"


def _break_detokenizer(core: LLMEngine) -> None:
    def push(token_ids):
        raise RuntimeError("secret detokenizer state")

    core.requests["bad"].detokenizer.push = push


def _break_stops(core: LLMEngine) -> None:
    def feed(text):
        raise RuntimeError("secret stop matcher state")

    core.requests["bad"].stops.feed = feed


def _nan_logits_for_bad(core: LLMEngine) -> None:
    sampler = core.runner.sampler
    sample = sampler.sample

    def poisoned(logits, rows, masks=None):
        logits = logits.clone()
        for i, row in enumerate(rows):
            if row.request_id == "bad":
                logits[i, 3] = float("nan")
        return sample(logits, rows, masks)

    sampler.sample = poisoned


FAULTS = {
    "generator": (Job("bad", [30, 31, 32, 33], SEEDED, "b"), _on_step(3, _break_generator)),
    "detokenizer": (Job("bad", [30, 31, 32, 33], GREEDY, "a"), _on_step(2, _break_detokenizer)),
    "stop-matcher": (Job("bad", [30, 31], GREEDY, None), _on_step(4, _break_stops)),
    "nan-logits": (Job("bad", [30, 31, 32, 33, 34], SEEDED, "a"), _on_step(2, _nan_logits_for_bad)),
    "nan-logits-with-logprobs": (Job("bad", [30, 31, 32], WITH_LOGPROBS, None), _on_step(1, _nan_logits_for_bad)),
    "overflowing-adapter": (Job("bad", [30, 31, 32, 33, 34, 35], GREEDY, "overflow"), None),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_request_failing_inside_a_step_fails_alone(core: LLMEngine, fault: str) -> None:
    bad, hook = FAULTS[fault]
    outputs = run(core, [bad, *NORMAL], hook)  # on a fresh engine the bad request comes first: it holds KV block 0
    assert_clean(core)
    assert core.num_request_failures == 1
    clean = run(core, NORMAL)  # after the failure: whatever it left in freed blocks must not matter either
    assert_failed_alone(outputs, clean, "bad")
    assert_clean(core)


def test_a_request_that_cannot_be_added_leaves_nothing_behind(core: LLMEngine, monkeypatch) -> None:
    clean = run(core, NORMAL)
    create = core.generators.create

    def create_or_fail(seed):
        if seed == 666:
            raise RuntimeError("no generator for you")
        return create(seed)

    monkeypatch.setattr(core.generators, "create", create_or_fail)
    bad = Job("bad", [1, 2, 3], SamplingParams(max_tokens=4, temperature=1.0, seed=666), "b")
    outputs = run(core, [*NORMAL[:2], bad, *NORMAL[2:]])
    assert isinstance(outputs["bad"][0], RuntimeError)
    assert all(summary(outputs[job.request_id]) == summary(clean[job.request_id]) for job in NORMAL)
    assert_clean(core)


def test_an_adapter_that_cannot_take_a_slot_fails_only_its_requests(core: LLMEngine, monkeypatch) -> None:
    clean = run(core, NORMAL)
    bind_slot = core.adapters.bind_slot

    def bind_or_fail(key):
        if key.startswith("overflow@"):
            raise ValueError("slot copy failed")
        return bind_slot(key)

    monkeypatch.setattr(core.adapters, "bind_slot", bind_or_fail)
    outputs = run(core, [Job("bad", [40, 41, 42], GREEDY, "overflow"), *NORMAL])
    assert_failed_alone(outputs, clean, "bad")
    assert_clean(core)


def test_a_failed_forward_fails_its_step_and_the_next_step_runs(core: LLMEngine, monkeypatch) -> None:
    clean = run(core, NORMAL)
    execute = core.runner.execute
    calls = []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device fell over")
        return execute(*args, **kwargs)

    monkeypatch.setattr(core.runner, "execute", fail_once)
    outputs = run(core, NORMAL[:2])
    assert len(calls) == 1 and core.last_step_failed  # both requests were in the step that failed
    for job in NORMAL[:2]:
        last = outputs[job.request_id][-1]
        assert last.finish_reason is FinishReason.ERROR and "device fell over" not in last.error
    assert_clean(core)
    again = run(core, NORMAL)
    assert all(summary(again[job.request_id]) == summary(clean[job.request_id]) for job in NORMAL)
    assert not core.last_step_failed
    assert_clean(core)


def test_a_failure_outside_the_forward_fails_everything_and_leaves_nothing(core: LLMEngine, monkeypatch) -> None:
    clean = run(core, NORMAL)
    schedule = core.scheduler.schedule
    calls = []

    def half_schedule_then_fail():
        calls.append(1)
        plan = schedule()  # blocks allocated, then the failure
        if len(calls) == 2:
            raise RuntimeError("scheduler bug")
        return plan

    monkeypatch.setattr(core.scheduler, "schedule", half_schedule_then_fail)
    outputs = run(core, NORMAL)
    assert all(outputs[job.request_id][-1].finish_reason is FinishReason.ERROR for job in NORMAL)
    assert_clean(core)
    monkeypatch.setattr(core.scheduler, "schedule", schedule)
    again = run(core, NORMAL)
    assert all(summary(again[job.request_id]) == summary(clean[job.request_id]) for job in NORMAL)


def test_a_sequence_without_a_request_is_dropped_not_run_forever(core: LLMEngine) -> None:
    clean = run(core, NORMAL)
    core.scheduler.add(Sequence("orphan", [1, 2, 3], GREEDY))  # what a half-done add_request used to leave
    outputs = run(core, NORMAL)
    assert "orphan" not in outputs and core.num_request_failures == 1
    assert all(summary(outputs[job.request_id]) == summary(clean[job.request_id]) for job in NORMAL)
    assert_clean(core)


def test_a_failing_merge_leaves_every_adapter_served_unmerged(core: LLMEngine, monkeypatch) -> None:
    clean = run(core, NORMAL)
    fill = core.merger.weight_merger.merge
    calls = []

    def merge_then_fail(weights):
        calls.append(1)
        fill(weights)  # every layer switched to the merged weights, then the failure
        raise RuntimeError("out of memory")

    monkeypatch.setattr(core.merger.weight_merger, "merge", merge_then_fail)
    monkeypatch.setattr(core.merger.policy, "decide", lambda demand, merged, now: next(iter(demand.per_adapter), None))
    outputs = run(core, NORMAL)
    assert calls and core.merger.merged is None and not core.merger.weight_merger.is_merged
    assert all(summary(outputs[job.request_id]) == summary(clean[job.request_id]) for job in NORMAL)
    assert_clean(core)
