"""Integration on the real default model (SmolLM2-135M-Instruct): exact against transformers."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.engine.batch_builder import build_forward_batch
from server.engine.factory import build_engine
from server.engine.sequence import SamplingParams, Sequence
from server.model.kv_cache import KVCache
from server.settings import Settings
from tests.helpers import hf_greedy

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain in one sentence why the sky is blue, please, in simple words for a child of five.",
    "Hi",
    "Translate 'good morning' into Spanish and German.",
]


@pytest.fixture(scope="module")
def engine(default_model_dir):
    engine = build_engine(Settings(kv_cache_bytes=64 * 2**20, max_num_batched_tokens=256, dtype="float32"))
    yield engine
    engine.shutdown()


def test_burst_of_mixed_lengths_matches_hf_generate(engine, default_model_dir):
    prompts = [engine.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(max_tokens=24, min_tokens=24, temperature=0.0)  # HF: min_new_tokens

    async def burst():
        async def one(i, prompt):
            return [t async for out in engine.generate(prompt, params, None, f"q{i}") for t in out.token_ids]

        return await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])

    assert asyncio.run(burst()) == hf_greedy(default_model_dir, prompts, 24)


def test_packed_logits_match_hf_forward(engine, default_model_dir):
    from transformers import LlamaForCausalLM

    runner = engine.core.runner
    hf = LlamaForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    prompts = [engine.encode_prompt(q) for q in QUESTIONS[:4]]
    seqs = [Sequence(str(i), p, SamplingParams()) for i, p in enumerate(prompts)]
    for i, seq in enumerate(seqs):
        seq.block_table = list(range(i * 8, i * 8 + 8))
    cache = KVCache(runner.loaded.spec, 64, 16, torch.float32, torch.device("cpu"))
    batch = build_forward_batch([(s, len(s)) for s in seqs], 16, torch.device("cpu"))
    with torch.inference_mode():
        ours = runner.model.compute_logits(runner.model(batch, cache)[batch.logits_indices])
        for row, prompt in zip(ours, prompts, strict=True):
            ref = hf(torch.tensor([prompt])).logits[0, -1]
            torch.testing.assert_close(row, ref, atol=2e-4, rtol=1e-4)


def test_three_adapters_on_the_default_model_match_peft(default_model_dir, tmp_path):
    from tests.helpers import make_peft_adapter, peft_greedy

    specs = {
        "qv8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "all4": dict(r=4, lora_alpha=8, target_modules="all-linear"),
        "dora-qkv": dict(r=8, lora_alpha=8, use_dora=True, target_modules=["q_proj", "k_proj", "v_proj"]),
    }
    for seed, (name, kwargs) in enumerate(specs.items()):
        make_peft_adapter(default_model_dir, tmp_path / name, seed=seed, b_scale=0.5, **kwargs)
    engine = build_engine(
        Settings(adapters_store=tmp_path, kv_cache_bytes=64 * 2**20, max_num_batched_tokens=128, dtype="float32")
    )
    try:
        prompts = [engine.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS[:4]]
        jobs = [*zip(specs, prompts, strict=False), (None, prompts[3])]
        params = SamplingParams(max_tokens=12, min_tokens=12, temperature=0.0)

        async def burst():
            async def one(i, adapter, prompt):
                return [t async for out in engine.generate(prompt, params, adapter, f"a{i}") for t in out.token_ids]

            return await asyncio.gather(*[one(i, a, p) for i, (a, p) in enumerate(jobs)])

        results = asyncio.run(burst())
    finally:
        engine.shutdown()
    for (adapter, prompt), got in zip(jobs, results, strict=True):
        assert got == peft_greedy(default_model_dir, tmp_path / adapter if adapter else None, prompt, 12), adapter
