"""Thread discipline: the engine thread computes with every core, every other thread that touches tensors with one."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from server.adapters import registry
from server.adapters.validation import load_from_store
from server.engine.factory import build_engine
from server.errors import ConfigurationError
from server.settings import Settings
from server.threads import engine_threads, single_threaded
from tests.helpers import make_peft_adapter


@pytest.fixture
def engine(tiny_model_dir):
    engine = build_engine(Settings(model=tiny_model_dir, kv_cache_bytes=2**20, block_size=4))
    yield engine
    engine.shutdown()


def test_the_engine_thread_loads_and_steps_with_the_engine_threads(engine):
    name, threads = asyncio.run(engine.call(lambda core: (threading.current_thread().name, torch.get_num_threads())))
    assert name == "loraplex-engine" and threads == engine_threads()


def test_adapter_loads_run_on_one_thread(tiny_model_dir, tmp_path, monkeypatch):
    make_peft_adapter(tiny_model_dir, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    seen = []

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return load_from_store(*args, **kwargs)

    monkeypatch.setattr(registry, "load_from_store", spy)
    engine = build_engine(Settings(model=tiny_model_dir, adapters_store=tmp_path, kv_cache_bytes=2**20, block_size=4))
    try:
        engine.adapters.release(asyncio.run(engine.adapters.acquire("a")))
    finally:
        engine.shutdown()
    assert seen == [1]


def test_single_threaded_pins_only_the_calling_thread():
    before = torch.get_num_threads()
    seen = []
    thread = threading.Thread(target=lambda: seen.append(single_threaded(torch.get_num_threads)))
    thread.start()
    thread.join()
    assert seen == [1] and torch.get_num_threads() == before


def test_calls_on_the_engine_thread_return_results_and_raise_errors(engine):
    assert asyncio.run(engine.call(lambda core: core.max_model_len)) == engine.max_model_len

    def fail(core):
        raise ValueError("from the engine thread")

    with pytest.raises(ValueError, match="from the engine thread"):
        asyncio.run(engine.call(fail))
    assert engine.is_ready()


def test_a_build_that_fails_on_the_engine_thread_raises_in_the_caller(tiny_model_dir):
    settings = Settings(model=tiny_model_dir, kv_cache_bytes=2**16, block_size=4, max_model_len=4096)
    with pytest.raises(ConfigurationError, match="--kv-cache-bytes"):
        build_engine(settings)
