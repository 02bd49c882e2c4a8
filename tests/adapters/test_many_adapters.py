"""A store of hundreds of adapters on a real engine: listing reads no weights, tiers keep their budgets while every
adapter is cycled through, cold loads are shared and never hold up another adapter's request, prefetches count."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from server.adapters import registry as registry_module
from server.adapters import validation
from server.adapters.heap import HeapTrimmer
from server.adapters.versions import adapter_name
from server.engine.async_engine import AsyncEngine
from server.engine.sequence import SamplingParams
from server.errors import NotFoundError
from tests.adapters.test_registry import PROMPT, start
from tests.helpers import make_peft_adapter

NUM_ADAPTERS = 300
SLOW_S = 4.0  # long next to a few tiny steps even on a busy machine


@pytest.fixture(scope="module")
def source(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("source")
    return make_peft_adapter(tiny_model_dir, root / "one", seed=0, r=4, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def big_store(source, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("big-store")
    for i in range(NUM_ADAPTERS):
        shutil.copytree(source, root / f"a{i:03d}")
    return root


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Names whose weights the registry read (`load_from_store`, the loader's only way to the disk)."""
    names: list[str] = []
    real = registry_module.load_from_store

    def counted(store, name, *args, **kwargs):
        names.append(name)
        return real(store, name, *args, **kwargs)

    monkeypatch.setattr(registry_module, "load_from_store", counted)
    return names


@pytest.fixture
def engine(tiny_model_dir, big_store, reads) -> Iterator[AsyncEngine]:
    weights = (big_store / "a000" / "adapter_model.safetensors").stat().st_size
    engine = start(tiny_model_dir, big_store, max_loras=4, max_cpu_loras=16, max_cpu_lora_bytes=5 * weights)
    yield engine
    engine.shutdown()


def test_listing_hundreds_of_adapters_reads_no_weights(engine, reads):
    models = engine.list_models()
    assert len(models) == NUM_ADAPTERS + 1 and reads == []
    assert len(engine.adapter_views()) == NUM_ADAPTERS and reads == []  # records come from the config only


async def test_cycling_through_every_adapter_keeps_each_tier_in_its_budget(engine, reads):
    registry, cache = engine.adapters, engine.adapters.cache
    budget = registry.limits.max_cpu_lora_bytes
    names = [f"a{i:03d}" for i in range(NUM_ADAPTERS)]
    series = None
    for _ in range(3):
        for batch in range(0, NUM_ADAPTERS, 4):  # four at a time: one per device slot, as a batch would
            keys = await asyncio.gather(*(registry.acquire(name) for name in names[batch : batch + 4]))
            slots = {cache.bind_slot(key) for key in keys}
            assert len(slots) == len(keys) and None not in slots
            for key in keys:
                cache.unbind_slot(key)
                registry.release(key)
            assert cache._host.num_bytes <= budget and len(cache._host) <= registry.limits.max_cpu_loras
            assert len(cache.resident()) <= registry.limits.max_loras
        # per-request and per-key state is gone once nothing runs: nothing grows with the adapters served
        assert not cache._requests and not cache._retired and not cache._loader._loading
        assert cache._prefetched <= set(cache._host.keys()) and len(registry._states) == NUM_ADAPTERS
        rendered = generate_latest(engine.metrics.registry).decode()
        lines = {line.split(" ")[0] for line in rendered.splitlines() if not line.startswith("#")}
        assert series is None or lines == series  # no series per adapter
        series = lines
    assert len(reads) == 3 * NUM_ADAPTERS  # the host tier holds 5 of 300: every cycle reads each again
    tiers = engine.metrics.adapter_tiers
    assert tiers.loads.labels("host", "ok")._value.get() == 3 * NUM_ADAPTERS
    assert tiers.loads.labels("device", "ok")._value.get() == 3 * NUM_ADAPTERS
    assert tiers.bytes.labels("host")._value.get() <= budget


async def test_evicted_memory_is_trimmed_on_a_loader_thread_once_per_budget_freed(engine):
    registry, cache = engine.adapters, engine.adapters.cache
    threads: list[str] = []
    key = await registry.acquire("a000")
    per_adapter = cache.host_weights(key).num_bytes  # every adapter is a copy of one: all the same size
    registry.release(key)
    cache.trimmer = HeapTrimmer(3 * per_adapter, trim=lambda: threads.append(threading.current_thread().name))
    for name in [f"a{i:03d}" for i in range(1, 60)]:
        registry.release(await registry.acquire(name))
    evicted = engine.metrics.cache_events.labels("eviction", "host")._value.get()
    assert evicted >= 50  # the host tier holds 5
    # trims happen at loads, after the evictions that freed enough: one per 3 evicted, give or take the last ones
    assert evicted // 3 - 2 <= len(threads) <= evicted // 3
    assert threads and all(name.startswith("adapter-loader") for name in threads)  # never the engine or event loop


async def test_many_cold_requests_for_one_adapter_load_it_once(engine, reads, monkeypatch):
    counted = registry_module.load_from_store

    def slow_read(*args, **kwargs):  # every request arrives while the one read is still under way
        time.sleep(SLOW_S)
        return counted(*args, **kwargs)

    monkeypatch.setattr(registry_module, "load_from_store", slow_read)
    params = SamplingParams(max_tokens=2, temperature=0)

    async def run(i: int) -> list:
        return [out async for out in engine.generate(PROMPT, params, "a007", f"r{i}")]

    results = await asyncio.gather(*(run(i) for i in range(20)))
    assert reads == ["a007"] and all(outs[-1].finished for outs in results)
    assert engine.metrics.adapter_tiers.loads.labels("host", "joined")._value.get() == 19


async def test_a_request_never_waits_for_another_adapters_load(engine, monkeypatch):
    real, slow_started = validation.validate_adapter_dir, threading.Event()

    def slow_for_a000(path, *args, **kwargs):
        if Path(path).name == "a000":
            slow_started.set()
            time.sleep(SLOW_S)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(validation, "validate_adapter_dir", slow_for_a000)
    params = SamplingParams(max_tokens=3, temperature=0)

    async def run(adapter: str | None, request_id: str) -> float:
        [out async for out in engine.generate(PROMPT, params, adapter, request_id)]
        return time.monotonic()

    await asyncio.gather(run(None, "warm-up"), run("a299", "warm-up-adapter"))  # first steps pay one-off costs
    begin = time.monotonic()
    slow = asyncio.create_task(run("a000", "slow"))
    await asyncio.to_thread(slow_started.wait, 5)
    others = await asyncio.gather(run("a001", "cold-other"), run("a002", "cold-other-2"), run(None, "base"))
    assert max(others) - begin < SLOW_S
    assert not slow.done(), [t - begin for t in others]  # both cold ones loaded past the slow one
    assert await slow - begin >= SLOW_S


async def test_a_prefetched_adapter_is_a_prefetch_hit_for_its_first_request(engine, reads):
    await engine.prefetch_adapter("a042")
    assert reads == ["a042"]
    [out async for out in engine.generate(PROMPT, SamplingParams(max_tokens=1), "a042", "r")]
    assert reads == ["a042"] and engine.metrics.adapter_tiers.prefetch_hits._value.get() == 1
    assert adapter_name(next(iter(engine.adapters.cache._host.keys()))) == "a042"


async def test_prefetching_an_unknown_adapter_is_a_404_and_a_warm_one_reads_nothing(engine, reads):
    with pytest.raises(NotFoundError):
        await engine.prefetch_adapter("no-such-adapter")
    await asyncio.gather(*(engine.prefetch_adapter("a001") for _ in range(5)))
    await engine.prefetch_adapter("a001")
    assert reads == ["a001"]


async def test_a_waiting_requests_adapter_is_copied_into_a_free_slot_before_it_runs(tiny_model_dir, big_store):
    engine = start(tiny_model_dir, big_store, max_loras=4, max_num_seqs=1)  # one runs, the next one waits
    try:
        long = SamplingParams(max_tokens=40, ignore_eos=True, temperature=0)
        running = asyncio.create_task(anext(aiter(engine.generate(PROMPT, long, None, "long"))))
        await running  # the base request holds the only running seat
        waiting = asyncio.create_task(_drain(engine.generate(PROMPT, SamplingParams(max_tokens=2), "a005", "w")))
        deadline = time.monotonic() + 10
        while not any(adapter_name(key) == "a005" for key in engine.adapters.cache.resident()):
            assert time.monotonic() < deadline and not waiting.done(), "a005 never reached a slot ahead of its turn"
            await asyncio.sleep(0.005)
        assert engine.core.scheduler.num_waiting == 1  # in its slot while its request still waits
        await waiting
        events = engine.metrics.cache_events
        assert events.labels("hit", "device")._value.get() >= 1 and events.labels("load", "device")._value.get() == 1
    finally:
        engine.shutdown()


async def _drain(outputs) -> list:
    return [out async for out in outputs]
