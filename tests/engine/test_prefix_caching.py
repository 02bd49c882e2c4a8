"""Prefix caching in the engine: outputs and logits equal those without it, hits only within one adapter version."""

from __future__ import annotations

import asyncio
import shutil
from collections import defaultdict
from dataclasses import replace

import pytest
import torch

from server.engine.factory import build_engine
from server.engine.llm_engine import LLMEngine
from server.engine.sequence import SamplingParams
from server.settings import Settings
from tests.helpers import make_adapter_store, make_peft_adapter, peft_greedy, peft_logits

ADAPTERS = {
    "lora": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear"),
    "other": dict(r=8, lora_alpha=8, target_modules=["k_proj", "down_proj"]),
}
SHARED = [3 + (17 * j) % 250 for j in range(13)]  # 3 full blocks of 4 and one token: every request starts with it
N = 6  # tokens generated per request


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory):
    return make_adapter_store(tiny_model_dir, tmp_path_factory.mktemp("prefix-store"), ADAPTERS)


@pytest.fixture
def engine_factory(tiny_model_dir, store):
    engines = []

    def make(**overrides):
        defaults = dict(
            adapters_store=store,
            kv_cache_bytes=2**20,
            block_size=4,
            max_num_batched_tokens=40,
            max_loras=4,
            dtype="float32",
        )
        settings = Settings(model=tiny_model_dir, **(defaults | overrides))
        engines.append(build_engine(settings))
        return engines[-1]

    yield make
    for engine in engines:
        engine.shutdown()


def _params(n: int = N) -> SamplingParams:
    return SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0)


def _suffix(i: int, length: int = 5) -> list[int]:
    return [5 + (31 * i + 7 * j) % 240 for j in range(length)]


class Driver:
    """Steps the engine core from the test thread, keeping each request's tokens, logits and cached count."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.core: LLMEngine = engine.core
        self.tokens: dict[str, list[int]] = defaultdict(list)
        self.logits: dict[str, list[torch.Tensor]] = defaultdict(list)  # one [vocab] row per sampled token
        self.cached: dict[str, int] = {}
        self.prompt_logprobs: dict[str, list] = defaultdict(list)
        self.jobs: dict[str, tuple[str | None, list[int]]] = {}
        self._order: list[str] = []
        row_of, sample = self.core._sampling_row, self.core.runner.sampler.sample

        def recording_row(seq):  # the runner asks for rows in the order of the logits it samples
            self._order.append(seq.request_id)
            return row_of(seq)

        def recording_sample(logits, rows, masks=None):
            for request_id, row in zip(self._order, logits, strict=True):
                self.logits[request_id].append(row.clone())
            self._order.clear()
            return sample(logits, rows, masks)

        self.core._sampling_row = recording_row
        self.core.runner.sampler.sample = recording_sample

    def add(self, request_id: str, adapter: str | None, prompt: list[int], n: int = N, **params) -> None:
        key = asyncio.run(self.engine.adapters.acquire(adapter)) if adapter else None
        self.core.add_request(request_id, prompt, replace(_params(n), **params), key)
        self.jobs[request_id] = (adapter, prompt)

    def step(self, times: int = 1) -> None:
        for _ in range(times):
            for out in self.core.step():
                self.tokens[out.request_id].extend(out.token_ids)
                self.cached[out.request_id] = out.num_cached_tokens
                self.prompt_logprobs[out.request_id] += out.prompt_logprobs or []

    def finish(self) -> None:
        while self.core.has_work:
            self.step()

    @property
    def blocks_used(self) -> int:
        return self.core.scheduler.block_manager.num_used_blocks


def _mixed_workload(driver: Driver) -> None:
    """Warm each adapter's shared prefix, then a concurrent mixed batch that must hit within each adapter only."""
    for i, adapter in enumerate([None, "lora", "dora"]):
        driver.add(f"warm-{adapter}", adapter, SHARED + _suffix(i))
    driver.finish()
    for i, adapter in enumerate([None, "lora", "dora", "other", "lora", "dora", None]):
        driver.add(f"mix-{i}-{adapter}", adapter, SHARED + _suffix(10 + i, 2 + i))
    turn = SHARED + _suffix(1) + driver.tokens["warm-lora"] + _suffix(20)  # a chat resending its history
    driver.add("turn-lora", "lora", turn)
    driver.finish()


def test_mixed_batches_equal_caching_off_and_hit_only_within_an_adapter(engine_factory, tiny_model_dir, store):
    on, off = Driver(engine_factory()), Driver(engine_factory(enable_prefix_caching=False))
    _mixed_workload(on)
    _mixed_workload(off)
    assert on.tokens == off.tokens
    for request_id, rows in off.logits.items():
        torch.testing.assert_close(torch.stack(on.logits[request_id]), torch.stack(rows), atol=1e-4, rtol=1e-4)
    assert all(cached == 0 for cached in off.cached.values())
    assert all(on.cached[f"warm-{adapter}"] == 0 for adapter in [None, "lora", "dora"])
    for request_id, (adapter, _) in on.jobs.items():
        if request_id.startswith("mix-"):
            assert on.cached[request_id] == (0 if adapter == "other" else 12), request_id  # 3 of SHARED's 13
    warm_computed = len(SHARED) + 5 + N - 1  # the warm request's prompt and output but its last token (never fed)
    assert on.cached["turn-lora"] == 4 * (warm_computed // 4)
    for request_id in ["mix-1-lora", "mix-2-dora", "turn-lora"]:
        adapter, prompt = on.jobs[request_id]
        assert on.tokens[request_id] == peft_greedy(tiny_model_dir, store / adapter, prompt, N)
    assert on.blocks_used == off.blocks_used == 0


def test_replaced_adapter_never_gets_the_old_versions_blocks(engine_factory, tiny_model_dir, store, tmp_path):
    own_store = shutil.copytree(store, tmp_path / "store")
    new = make_peft_adapter(tiny_model_dir, tmp_path / "new", seed=7, r=8, lora_alpha=16, target_modules="all-linear")
    driver = Driver(engine_factory(adapters_store=own_store))
    prompt = SHARED + _suffix(0)
    driver.add("old", "lora", prompt)
    driver.finish()
    with open(new / "adapter_config.json", "rb") as config, open(new / "adapter_model.safetensors", "rb") as weights:
        driver.engine.adapters.add("lora", config, weights, replace=True, mode=None, pinned=None)
    driver.add("new", "lora", prompt)
    driver.finish()
    driver.add("new-again", "lora", prompt)
    driver.finish()
    assert driver.cached["new"] == 0 and driver.cached["new-again"] == 16  # every full block of its 18 tokens
    fresh = peft_greedy(tiny_model_dir, new, prompt, N)
    assert driver.tokens["new"] == driver.tokens["new-again"] == fresh != driver.tokens["old"]
    assert driver.blocks_used == 0


def test_cancel_preempt_and_error_paths_leak_no_blocks(engine_factory, tiny_model_dir, store):
    engine = engine_factory(kv_cache_bytes=24 * 4 * 512, max_model_len=64)  # 24 blocks: 6 requests preempt
    driver = Driver(engine)
    for i in range(6):
        driver.add(f"r{i}", [None, "lora", "dora"][i % 3], SHARED + _suffix(i), n=24)
    driver.step(3)
    driver.core.abort("r1")  # shares its prefix blocks with r4
    driver.finish()
    assert driver.core.scheduler.num_preemptions > 0
    assert driver.blocks_used == 0
    assert any(driver.cached[f"r{i}"] for i in range(3, 6))  # admitted after the first three cached the prefix
    for request_id in ["r0", "r2", "r3", "r4", "r5"]:
        adapter, prompt = driver.jobs[request_id]
        assert driver.tokens[request_id] == peft_greedy(
            tiny_model_dir, store / adapter if adapter else None, prompt, 24
        )
    for i in range(3):
        driver.add(f"e{i}", "lora", SHARED + _suffix(i))
    driver.step()
    driver.core.fail_all("injected fault")
    assert driver.blocks_used == 0 and not driver.core.has_work


def _peft_rows(model_dir, store, adapter: str | None, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """PEFT's logits `[len(tokens), vocab]` at the positions that sampled `tokens`."""
    logits = peft_logits(model_dir, store / adapter if adapter else None, prompt + tokens[:-1])
    return logits[len(prompt) - 1 :]


@pytest.mark.parametrize("first_merged", [True, False], ids=["merged-then-unmerged", "unmerged-then-merged"])
def test_blocks_computed_merged_serve_unmerged_requests_and_back(engine_factory, tiny_model_dir, store, first_merged):
    # The measurement behind leaving the merge state out of the block key (server/engine/block_manager.py).
    engine = engine_factory(merged=["dora"], merge_window_s=3600)
    driver, merger = Driver(engine), engine.core.merger
    key = asyncio.run(engine.adapters.acquire("dora"))
    if not first_merged:
        merger.policy.refuse(key)
    for i, adapter in enumerate([None, "dora", "lora"]):
        driver.add(f"first-{adapter}", adapter, SHARED + _suffix(i))
    driver.finish()
    assert (merger.merged == key) is first_merged
    if first_merged:
        merger.policy.refuse(key)  # unmerged at the next step
    else:
        merger.policy.refused.discard(key)  # merged at the next step: dora has a request
    for i, adapter in enumerate([None, "dora", "lora"]):
        driver.add(f"then-{adapter}", adapter, SHARED + _suffix(5 + i))
    driver.step()
    assert (merger.merged == key) is not first_merged
    driver.finish()
    for adapter in [None, "dora", "lora"]:
        request_id = f"then-{adapter}"
        _, prompt = driver.jobs[request_id]
        tokens = driver.tokens[request_id]
        assert driver.cached[request_id] == 12
        assert tokens == peft_greedy(tiny_model_dir, store / adapter if adapter else None, prompt, N)
        want = _peft_rows(tiny_model_dir, store, adapter, prompt, tokens)
        torch.testing.assert_close(torch.stack(driver.logits[request_id]), want, atol=1e-4, rtol=1e-4)
    engine.adapters.release(key)


def test_a_request_scoring_its_prompt_computes_the_positions_that_score_it(engine_factory, tiny_model_dir, store):
    driver = Driver(engine_factory())
    prompt = SHARED + _suffix(0)
    driver.add("warm", "lora", prompt)
    driver.finish()
    driver.add("scored", "lora", prompt, prompt_logprobs=0)
    driver.finish()
    assert driver.cached["scored"] == 0
    got = torch.tensor([lp.logprob for lp in driver.prompt_logprobs["scored"]])
    want = torch.log_softmax(peft_logits(tiny_model_dir, store / "lora", prompt), -1)[:-1]
    torch.testing.assert_close(got, want.gather(-1, torch.tensor(prompt[1:])[:, None]).squeeze(-1), atol=1e-4, rtol=0)
