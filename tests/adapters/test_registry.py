"""The registry on a real engine: versions under replacement and deletion, pins, host LRU, off-thread cold loads."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.adapters import digests, validation
from server.adapters.registry import AdapterRegistry
from server.adapters.versions import adapter_name
from server.engine.async_engine import AsyncEngine
from server.engine.factory import build_engine
from server.engine.sequence import SamplingParams
from server.errors import NotFoundError
from server.settings import Settings
from tests.helpers import make_peft_adapter

LOAD_S = 1.0
PROMPT = [5, 17, 99, 42]


@pytest.fixture(scope="module")
def sources(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {name: make_peft_adapter(tiny_model_dir, root / name, seed=i, r=4, target_modules=["q_proj", "v_proj"])
            for i, name in enumerate(["a", "b", "c", "d"])}  # fmt: skip


@pytest.fixture
def store(tmp_path, sources) -> Path:
    root = tmp_path / "store"
    for name, source in sources.items():
        shutil.copytree(source, root / name)
    return root


def start(model_dir: Path, store: Path, **overrides) -> AsyncEngine:
    settings = dict(model=model_dir, adapters_store=store, kv_cache_bytes=2**21, block_size=4, max_loras=2,
                    max_cpu_loras=2)  # fmt: skip
    return build_engine(Settings(**{**settings, **overrides}))


@pytest.fixture
def engine(tiny_model_dir, store) -> Iterator[AsyncEngine]:
    engine = start(tiny_model_dir, store)
    yield engine
    engine.shutdown()


def replace(registry: AdapterRegistry, name: str, source: Path) -> None:
    with (source / "adapter_config.json").open("rb") as config, (source / "adapter_model.safetensors").open("rb") as w:
        registry.add(name, config, w, replace=True, mode=None, pinned=None)


async def test_a_replacement_leaves_running_sequences_their_version(engine, sources):
    registry = engine.adapters
    old = await registry.acquire("a")
    old_slot = registry.cache.bind_slot(old)
    old_weights = registry.cache.host_weights(old)
    replace(registry, "a", sources["b"])
    new = await registry.acquire("a")
    assert new != old and adapter_name(new) == adapter_name(old) == "a"
    new_slot = registry.cache.bind_slot(new)
    assert new_slot != old_slot and old in registry.cache.resident() and registry.cache.host_weights(old) is old_weights
    assert registry.view("a").running == 2
    registry.cache.unbind_slot(old)
    registry.release(old)
    assert old not in registry.cache.resident() and registry.cache.host_weights(old) is None  # freed with its last user
    assert new in registry.cache.resident()
    registry.cache.unbind_slot(new)
    registry.release(new)
    assert new in registry.cache.resident()  # the current version stays resident until evicted


async def test_a_deleted_adapter_serves_its_running_requests_then_goes(engine, store):
    registry = engine.adapters
    key = await registry.acquire("a")
    registry.remove("a")
    assert not (store / "a").exists() and not registry.exists("a")
    with pytest.raises(NotFoundError):
        await registry.acquire("a")
    slot = registry.cache.bind_slot(key)  # a sequence admitted before the deletion still runs
    assert slot >= 0 and registry.cache.host_weights(key) is not None
    registry.cache.unbind_slot(key)
    registry.release(key)
    assert registry.cache.host_weights(key) is None and registry.cache.resident() == []
    assert [name for name, _ in registry.listing()] == ["b", "c", "d"]


async def test_a_pinned_adapter_is_never_evicted_and_holds_its_slot(engine):
    registry = engine.adapters
    registry.update("a", mode=None, pinned=True)
    pinned = await registry.acquire("a")
    registry.cache.bind_slot(pinned)
    registry.cache.unbind_slot(pinned)
    registry.release(pinned)
    for name in ["b", "c", "d"]:
        key = await registry.acquire(name)
        assert registry.cache.fits(key, set()) and not registry.cache.fits(key, {"x@1"})  # the pin leaves one slot
        registry.cache.bind_slot(key)
        registry.cache.unbind_slot(key)
        registry.release(key)
        assert pinned in registry.cache.resident() and registry.cache.host_weights(pinned) is not None
    registry.update("a", mode=None, pinned=False)
    key = await registry.acquire("b")
    registry.cache.bind_slot(key)
    assert pinned not in registry.cache.resident()  # unpinned, it is evicted like any idle adapter


async def test_the_host_cache_evicts_least_recently_used(tiny_model_dir, store):
    engine = start(tiny_model_dir, store, max_loras=1, max_cpu_loras=2)
    try:
        registry = engine.adapters
        keys = []
        for name in ["a", "b", "c"]:
            keys.append(await registry.acquire(name))
            registry.release(keys[-1])
        assert [registry.cache.host_weights(k) is not None for k in keys] == [False, True, True]
        assert registry.view("a").tier == "disk" and registry.view("c").tier == "host"
    finally:
        engine.shutdown()


async def test_a_reload_of_an_unchanged_adapter_does_not_hash_its_file_again(tiny_model_dir, store, monkeypatch):
    hashed = []
    real = digests.file_digest
    monkeypatch.setattr(digests, "file_digest", lambda file: hashed.append(file.parent.name) or real(file))
    engine = start(tiny_model_dir, store, max_loras=1, max_cpu_loras=1)
    try:
        registry = engine.adapters
        for name in ["a", "b"]:
            registry.release(await registry.acquire(name))
        assert registry.view("a").tier == "disk"  # evicted by b's load: the next acquire reads it again
        registry.release(await registry.acquire("a"))
        assert hashed == ["a", "b"]
        file = store / "a" / "adapter_model.safetensors"
        assert registry.view("a").record.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
    finally:
        engine.shutdown()


async def test_the_host_cache_is_bounded_in_bytes(engine, tiny_model_dir, store):
    key = await engine.adapters.acquire("a")
    size = engine.adapters.cache.host_weights(key).num_bytes  # every source adapter has the same shapes
    engine.adapters.release(key)
    bounded = start(tiny_model_dir, store, max_loras=1, max_cpu_loras=8, max_cpu_lora_bytes=size * 3 // 2)
    try:
        registry = bounded.adapters
        keys = []
        for name in ["a", "b", "c"]:
            keys.append(await registry.acquire(name))
        assert all(registry.cache.host_weights(k) is not None for k in keys)  # held ones stay, whatever the budget
        for k in keys:
            registry.release(k)
        assert [registry.cache.host_weights(k) is not None for k in keys] == [False, False, True]
    finally:
        bounded.shutdown()


async def test_folders_added_or_removed_by_hand_are_noticed(engine, store, sources):
    shutil.copytree(sources["a"], store / "late")
    assert engine.resolve_adapter("late") == "late"
    assert "late" in [name for name, _ in engine.adapters.listing()]
    shutil.rmtree(store / "late")
    assert "late" not in [name for name, _ in engine.adapters.listing()]
    with pytest.raises(NotFoundError):
        engine.resolve_adapter("late")


async def test_refresh_serves_what_another_process_wrote_to_the_store(tiny_model_dir, engine, store, sources):
    other = start(tiny_model_dir, store)  # a second server on the same store, as Ray Serve replicas share one
    try:
        old = await engine.adapters.acquire("a")  # running on the old weights, warm in host memory
        replace(other.adapters, "a", sources["b"])
        other.adapters.update("a", mode="merged", pinned=None)
        assert (await engine.adapters.acquire("a")) == old  # nothing told this one yet
        engine.adapters.release(old)
        engine.adapters.refresh("a")
        new = await engine.adapters.acquire("a")
        assert new != old and engine.adapters.view("a").meta.mode == "merged"
        assert engine.adapters.view("a").record.sha256 == other.adapters.view("a").record.sha256
        assert engine.adapters.cache.host_weights(old) is not None  # its running request keeps the old version
        engine.adapters.release(old)
        assert engine.adapters.cache.host_weights(old) is None
        engine.adapters.release(new)
        other.adapters.remove("a")
        engine.adapters.refresh("a")
        assert engine.adapters.cache.host_weights(new) is None
        with pytest.raises(NotFoundError):
            engine.adapters.view("a")
    finally:
        other.shutdown()


@pytest.fixture
def slow_loads(monkeypatch):
    real = validation.validate_adapter_dir

    def slow(*args, **kwargs):
        time.sleep(LOAD_S)
        return real(*args, **kwargs)

    monkeypatch.setattr(validation, "validate_adapter_dir", slow)


async def test_a_cold_load_does_not_stall_other_requests(tiny_model_dir, store, slow_loads):
    engine = start(tiny_model_dir, store)
    times: list[float] = []
    stop = asyncio.Event()

    async def base_traffic(stream: int) -> None:
        params = SamplingParams(max_tokens=40, ignore_eos=True, temperature=0)
        for i in range(10_000):
            if stop.is_set():
                return
            async for _ in engine.generate(PROMPT, params, None, f"base-{stream}-{i}"):
                times.append(time.monotonic())

    try:
        traffic = [asyncio.create_task(base_traffic(i)) for i in range(2)]
        await asyncio.sleep(0.2)
        begin = time.monotonic()
        outs = [o async for o in engine.generate(PROMPT, SamplingParams(max_tokens=4), "a", "cold")]
        end = time.monotonic()
        stop.set()
        await asyncio.gather(*traffic)
    finally:
        engine.shutdown()
    assert outs[-1].finished and end - begin >= LOAD_S
    during = [t for t in times if begin <= t <= begin + LOAD_S]
    assert len(during) >= 50  # the engine kept stepping (~2 ms per step here) while the adapter loaded
    gaps = [b - a for a, b in itertools.pairwise(during)]
    assert max(gaps) < LOAD_S / 4


async def test_a_caller_giving_up_does_not_cancel_a_shared_load(tiny_model_dir, store, slow_loads):
    engine = start(tiny_model_dir, store)
    try:
        registry = engine.adapters
        quitter = asyncio.create_task(registry.acquire("b"))
        stayer = asyncio.create_task(registry.acquire("b"))
        await asyncio.sleep(0.1)
        quitter.cancel()
        key = await stayer
        assert registry.cache.host_weights(key) is not None and registry.view("b").waiting == 1
        registry.release(key)
        assert registry.view("b").waiting == 0
    finally:
        engine.shutdown()


async def test_a_sequence_whose_request_was_cancelled_gets_no_slot(tiny_model_dir, store):
    engine = start(tiny_model_dir, store, max_loras=1, max_cpu_loras=1)
    try:
        registry = engine.adapters
        cancelled = await registry.acquire("a")
        registry.release(cancelled)  # the request hung up before the engine dropped its sequence
        other = await registry.acquire("b")  # pushes "a" out of the host cache
        assert registry.cache.bind_slot(cancelled) is None and registry.cache.resident() == []
        assert registry.cache.bind_slot(other) == 0
        assert registry.mode(cancelled) == registry.mode("a") == "unmerged"
    finally:
        engine.shutdown()


async def test_requests_wait_for_a_slot_next_to_a_pinned_adapter(engine):
    registry = engine.adapters  # max_loras 2: the pinned adapter leaves one slot to the others
    registry.update("a", mode=None, pinned=True)
    params = SamplingParams(max_tokens=6, min_tokens=6, temperature=0)

    async def run(adapter: str, i: int) -> list:
        return [o async for o in engine.generate(PROMPT, params, adapter, f"r{i}")]

    results = await asyncio.gather(*[run(name, i) for i, name in enumerate(["a", "b", "c", "d", "b", "a"])])
    assert all(outs[-1].finished and outs[-1].error is None for outs in results)
    assert sum(len(o.token_ids) for o in results[1]) == 6
    assert len(registry.cache.resident()) == 2 and registry.view("a").tier == "device"
