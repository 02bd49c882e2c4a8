"""Many LoRA and DoRA adapters plus base requests in one concurrent burst, exact against PEFT per adapter."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch

from server.engine.batch_builder import build_forward_batch
from server.engine.factory import build_engine
from server.engine.sequence import SamplingParams, Sequence
from server.errors import AdapterError, NotFoundError
from server.model.kv_cache import KVCache
from server.model.routing import BASE_SLOT, make_lora_batch
from server.settings import Settings
from tests.helpers import make_adapter_store, peft_greedy, peft_logits

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "r1-q": dict(r=1, lora_alpha=2, target_modules=["q_proj"]),
    "r8-qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "r16-all": dict(r=16, lora_alpha=8, target_modules=ALL),
    "r64-kod": dict(r=64, lora_alpha=32, target_modules=["k_proj", "o_proj", "down_proj"]),
    "rslora-gu": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["gate_proj", "up_proj"]),
    "pattern": dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"down_proj": 12},
                    alpha_pattern={"q_proj": 3}),
    "dora-qv": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]),
    "dora-all": dict(r=8, lora_alpha=16, use_dora=True, target_modules="all-linear"),
    "layer1-o": dict(r=8, lora_alpha=8, target_modules=["o_proj"], layers_to_transform=[1]),
}  # fmt: skip


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory):
    return make_adapter_store(tiny_model_dir, tmp_path_factory.mktemp("store"), ADAPTERS)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, store):
    settings = Settings(model=tiny_model_dir, adapters_store=store, kv_cache_bytes=2**20, block_size=4,
                        max_num_batched_tokens=48, max_loras=6, dtype="float32")  # fmt: skip
    engine = build_engine(settings)
    yield engine
    engine.shutdown()


def _prompt(i: int) -> list[int]:
    return [3 + (11 * i + 7 * j) % 250 for j in range(3 + (5 * i) % 23)]


def test_concurrent_burst_matches_peft_per_adapter(engine, tiny_model_dir, store):
    jobs = [(name, _prompt(i)) for i, name in enumerate(ADAPTERS)]
    jobs += [(None, _prompt(20)), (None, _prompt(21)), ("r8-qv", _prompt(22)), ("dora-all", _prompt(23))]
    params = SamplingParams(max_tokens=10, min_tokens=10, temperature=0.0)

    async def burst():
        async def one(i, adapter, prompt):
            outs = [o async for o in engine.generate(prompt, params, adapter, f"m{i}")]
            return [t for o in outs for t in o.token_ids]

        return await asyncio.gather(*[one(i, a, p) for i, (a, p) in enumerate(jobs)])

    results = asyncio.run(burst())  # 9 adapters over 6 slots: some requests wait for a slot, none fails
    for (adapter, prompt), got in zip(jobs, results, strict=True):
        want = peft_greedy(tiny_model_dir, store / adapter if adapter else None, prompt, 10)
        assert got == want, adapter
    assert len(engine.adapters.cache.resident()) <= 6
    assert engine.core.scheduler.block_manager.num_used_blocks == 0


def test_mixed_prefill_logits_match_peft(engine, tiny_model_dir, store):
    names = list(ADAPTERS)[:6]  # one per slot
    runner, adapters = engine.core.runner, engine.adapters

    async def acquire_all():
        return await asyncio.gather(*[adapters.acquire(n) for n in names])

    keys = asyncio.run(acquire_all())
    seqs, slots = [], []
    for i, key in enumerate([*keys, None]):
        seq = Sequence(f"l{i}", _prompt(30 + i), SamplingParams())
        seq.block_table = list(range(8 * i, 8 * i + 8))
        seqs.append(seq)
        slots.append(adapters.cache.bind_slot(key) if key else BASE_SLOT)
    order = sorted(range(len(seqs)), key=lambda i: slots[i])
    batch = build_forward_batch([(seqs[i], len(seqs[i])) for i in order], 4, torch.device("cpu"),
                                [slots[i] for i in order])  # fmt: skip
    cache = KVCache(runner.loaded.spec, 64, 4, torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        logits = runner.model.compute_logits(runner.model(batch, cache, make_lora_batch(batch.adapter_slots)))
    for row, i in enumerate(order):
        name = [*names, None][i]
        got = logits[batch.query_start[row] : batch.query_start[row + 1]]
        want = peft_logits(tiny_model_dir, store / name if name else None, seqs[i].prompt_token_ids)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for key in keys:
        adapters.cache.unbind_slot(key)
        adapters.release(key)


def test_models_lists_every_adapter_with_its_parent(engine):
    cards = engine.list_models()
    assert cards[0].name == engine.served_model_name and cards[0].parent is None
    assert sorted(c.name for c in cards[1:]) == sorted(ADAPTERS)
    assert all(c.parent == engine.served_model_name for c in cards[1:])


def test_unknown_and_invalid_adapters_are_refused(engine, store):
    with pytest.raises(NotFoundError):
        engine.resolve_adapter("no-such-adapter")
    with pytest.raises(NotFoundError):
        engine.resolve_adapter("../r8-qv")
    broken = store / "broken"
    shutil.copytree(store / "r8-qv", broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    pickled = store / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps(config))
    (pickled / "adapter_model.bin").write_bytes(b"not unpickled")

    async def run(adapter):
        params = SamplingParams(max_tokens=3, temperature=0.0)
        return [o async for o in engine.generate(_prompt(1), params, adapter, f"bad-{adapter}")]

    for adapter, field in (("broken", "modules_to_save"), ("pickled", "safetensors")):
        with pytest.raises(AdapterError, match=field):
            asyncio.run(run(engine.resolve_adapter(adapter)))
    assert asyncio.run(run("r8-qv"))[-1].finished
    shutil.rmtree(broken)
    shutil.rmtree(pickled)
