"""Every family served through the engine with LoRA, rsLoRA and DoRA adapters: a concurrent mixed burst, prefix-cache
hits and a merged adapter, greedy tokens equal to transformers + PEFT in float32."""

from __future__ import annotations

import asyncio

import pytest

from server.engine.factory import build_engine
from server.engine.sequence import SamplingParams
from server.model.architecture import FAMILIES as SERVED
from server.model.module_names import ModuleNames
from server.settings import Settings
from tests.families import FAMILIES, make_family_checkpoint
from tests.helpers import make_adapter_store, peft_greedy

NEW_TOKENS = 6
SERVED_FAMILIES = ["llama3", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3"]


def _adapters(modules: ModuleNames) -> dict[str, dict]:
    """LoRA on every projection, DoRA on the first attention projection and o_proj, rsLoRA with a rank pattern."""
    first, last = modules.targets[0], modules.targets[-1]
    return {
        "lora": dict(r=8, lora_alpha=16, target_modules="all-linear"),
        "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=[first, "o_proj"]),
        "rslora": dict(r=4, lora_alpha=4, use_rslora=True, target_modules=[first, last], rank_pattern={last: 6}),
    }


@pytest.fixture(scope="module", params=SERVED_FAMILIES)
def served(request, tmp_path_factory):
    name = request.param
    model_dir = make_family_checkpoint(tmp_path_factory.mktemp(name), name)
    config_class, _ = FAMILIES[name]
    modules = SERVED[config_class.model_type].modules
    store = make_adapter_store(model_dir, tmp_path_factory.mktemp(f"{name}-store"), _adapters(modules))
    return model_dir, store


def _engine(model_dir, store, **overrides):
    settings = Settings(model=model_dir, adapters_store=store, kv_cache_bytes=2**20, block_size=4,
                        max_num_batched_tokens=16, max_loras=3, dtype="float32", **overrides)  # fmt: skip
    return build_engine(settings)


def _prompt(i: int, length: int) -> list[int]:
    return [3 + (11 * i + 7 * j) % 250 for j in range(length)]


def _burst(engine, jobs: list[tuple[str | None, list[int]]]) -> list[tuple[list[int], int]]:
    """Every job at once; each one's greedy tokens and cached prompt tokens."""
    params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0.0)

    async def run():
        async def one(i, adapter, prompt):
            outs = [o async for o in engine.generate(prompt, params, adapter, f"r{i}")]
            return [t for o in outs for t in o.token_ids], max(o.num_cached_tokens for o in outs)

        return await asyncio.gather(*[one(i, a, p) for i, (a, p) in enumerate(jobs)])

    return asyncio.run(run())


def _check(model_dir, store, jobs, results) -> None:
    for (adapter, prompt), (tokens, _) in zip(jobs, results, strict=True):
        assert tokens == peft_greedy(model_dir, store / adapter if adapter else None, prompt, NEW_TOKENS), adapter


def test_a_mixed_burst_then_prefix_hits_match_peft(served):
    model_dir, store = served
    jobs = [(None, _prompt(0, 21)), ("lora", _prompt(1, 13)), ("dora", _prompt(2, 26)), ("rslora", _prompt(3, 9)),
            ("lora", _prompt(4, 17))]  # fmt: skip
    engine = _engine(model_dir, store)
    try:
        _check(model_dir, store, jobs, _burst(engine, jobs))
        again = [(adapter, [*prompt, 7, 8, 9]) for adapter, prompt in jobs]  # the same prompts, longer
        results = _burst(engine, again)
        _check(model_dir, store, again, results)
        assert all(cached >= 8 for _, cached in results)  # whole blocks of each prompt came from the cache
    finally:
        engine.shutdown()


def test_a_merged_adapter_beside_others_matches_peft(served):
    model_dir, store = served
    jobs = [("dora", _prompt(5, 15)), ("lora", _prompt(6, 11)), (None, _prompt(7, 19)), ("rslora", _prompt(8, 10))]
    engine = _engine(model_dir, store, merged=["dora"], merge_window_s=3600)
    try:
        _check(model_dir, store, jobs, _burst(engine, jobs))
        assert engine.core.merger.merged.startswith("dora")
    finally:
        engine.shutdown()
