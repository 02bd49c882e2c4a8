"""The engine end to end on a tiny random Llama: exactness against transformers, determinism, no KV leaks."""

from __future__ import annotations

import asyncio

import pytest

from server.engine.factory import build_engine
from server.engine.sequence import FinishReason, SamplingParams
from server.errors import InvalidRequestError
from server.settings import Settings
from tests.helpers import hf_greedy


@pytest.fixture
def engine_factory(tiny_model_dir):
    engines = []

    def make(**overrides):
        settings = Settings(
            model=tiny_model_dir, **{"kv_cache_bytes": 2**20, "block_size": 4, "dtype": "float32", **overrides}
        )
        engines.append(build_engine(settings))
        return engines[-1]

    yield make
    for engine in engines:
        engine.shutdown()


async def _collect(engine, prompt, params, request_id="r", adapter=None):
    outs = [out async for out in engine.generate(prompt, params, adapter, request_id)]
    return [t for o in outs for t in o.token_ids], "".join(o.text for o in outs), outs[-1]


def _prompts(n: int) -> list[list[int]]:
    return [[3 + (7 * i + 13 * j) % 250 for j in range(1 + (11 * i) % 40)] for i in range(n)]


def _blocks_used(engine) -> int:
    return engine.core.scheduler.block_manager.num_used_blocks


async def test_concurrent_burst_matches_hf_generate(engine_factory, tiny_model_dir):
    engine = engine_factory(max_num_batched_tokens=64)  # small budget: prefills chunk and mix with decodes
    prompts = _prompts(12)
    params = SamplingParams(max_tokens=20, min_tokens=20, temperature=0.0)
    results = await asyncio.gather(*[_collect(engine, p, params, f"r{i}") for i, p in enumerate(prompts)])
    assert [tokens for tokens, _, _ in results] == hf_greedy(tiny_model_dir, prompts, 20)
    assert all(last.finish_reason is FinishReason.LENGTH for _, _, last in results)
    assert _blocks_used(engine) == 0


async def test_preemption_recomputes_exactly_and_frees_every_block(engine_factory, tiny_model_dir):
    # 40 blocks of 4 tokens: 8 sequences growing to ~60 tokens cannot all stay resident.
    engine = engine_factory(kv_cache_bytes=40 * 4 * 512, max_model_len=128)
    prompts = [p[:20] for p in _prompts(8)]
    params = SamplingParams(max_tokens=40, min_tokens=40, temperature=0.0)
    results = await asyncio.gather(*[_collect(engine, p, params, f"r{i}") for i, p in enumerate(prompts)])
    assert [tokens for tokens, _, _ in results] == hf_greedy(tiny_model_dir, prompts, 40)
    assert engine.core.scheduler.num_preemptions > 0
    assert _blocks_used(engine) == 0


async def test_seeded_sampling_is_independent_of_the_batch(engine_factory):
    engine = engine_factory()
    prompt = _prompts(3)[2]
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone, _, _ = await _collect(engine, prompt, params, "alone")
    others = [
        _collect(engine, p, SamplingParams(max_tokens=12, temperature=1.3, ignore_eos=True), f"o{i}")
        for i, p in enumerate(_prompts(6))
    ]
    batched = await asyncio.gather(_collect(engine, prompt, params, "batched"), *others)
    assert batched[0][0] == alone
    unseeded = SamplingParams(max_tokens=16, temperature=0.9, ignore_eos=True, seed=99)
    assert (await _collect(engine, prompt, unseeded, "x"))[0] != alone


async def test_cancelled_request_frees_its_blocks(engine_factory):
    engine = engine_factory()
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    stream = engine.generate(_prompts(5)[4], params, None, "cancel-me")
    first = await anext(stream)
    assert not first.finished
    await stream.aclose()
    _, _, last = await _collect(engine, _prompts(2)[1], SamplingParams(max_tokens=5, temperature=0.0), "s")
    assert last.finished
    for _ in range(100):
        if not engine.core.has_work:
            break
        await asyncio.sleep(0.01)
    assert _blocks_used(engine) == 0
    assert "cancel-me" not in engine.core.requests


async def test_stop_string_ends_generation_and_is_not_emitted(engine_factory):
    engine = engine_factory()
    prompt = _prompts(4)[3]
    free_run = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    _, text, _ = await _collect(engine, prompt, free_run, "free")
    stop = text[5:8]
    assert stop
    _, stopped_text, last = await _collect(engine, prompt, SamplingParams(**{**free_run.__dict__, "stop": (stop,)}))
    assert last.finish_reason is FinishReason.STOP
    assert stopped_text == text[: text.index(stop)]


async def test_max_model_len_finishes_with_length(engine_factory):
    engine = engine_factory(max_model_len=32)
    prompt = _prompts(1)[0] * 30
    with pytest.raises(InvalidRequestError, match="over the model's context length 32"):
        await _collect(engine, prompt[:30], SamplingParams(max_tokens=5))
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    tokens, _, last = await _collect(engine, prompt[:30], params)
    assert len(tokens) == 2 and last.finish_reason is FinishReason.LENGTH
