"""The real engine behind the app records every request, step and queue gauge, under capped adapter labels."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.api import create_app
from server.engine.factory import build_engine
from server.settings import Settings
from tests.helpers import make_peft_adapter


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    for seed, name in enumerate(("sql", "poet")):
        make_peft_adapter(tiny_model_dir, root / name, seed=seed, r=4, lora_alpha=8, target_modules=["q_proj"])
    return root


@pytest.fixture
async def client(tiny_model_dir, store) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(model=tiny_model_dir, adapters_store=store, served_model_name="tiny", kv_cache_bytes=2**20,
                        block_size=4, max_loras=3, metrics_max_adapters=1)  # fmt: skip
    app = create_app(settings, build_engine)
    transport = httpx.ASGITransport(app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for _ in range(600):
            if (await client.get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        yield client


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


async def test_traffic_is_recorded_per_adapter_with_the_label_cap(client):
    body = {"prompt": [5, 6, 7, 8, 9], "max_tokens": 4, "ignore_eos": True, "temperature": 0}
    replies = await asyncio.gather(
        *(client.post("/v1/completions", json={**body, "model": m}) for m in ("tiny", "sql", "poet")),
        # another prompt: the first tiny request's cached block would make this one's step tokens vary with timing
        client.post("/v1/completions", json={**body, "model": "tiny", "stream": True, "prompt": [9, 8, 7, 6, 5]}),
    )
    assert [r.status_code for r in replies] == [200] * 4
    assert (await client.post("/v1/completions", json={**body, "model": "nope"})).status_code == 404
    text = (await client.get("/metrics")).text
    types = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert types["loraplex_time_to_first_token_seconds"] == "histogram"
    assert types["loraplex_requests"] == "counter" and types["loraplex_num_requests_running"] == "gauge"
    found = samples(text)
    # metrics_max_adapters=1: the first adapter seen keeps its name, the other is "other"; the base is always named
    adapters = {dict(labels)["adapter"] for name, labels in found if name == "loraplex_requests_total"}
    assert len(adapters) == 3 and {"tiny", "other"} <= adapters and adapters - {"tiny", "other"} <= {"sql", "poet"}
    assert value(found, "loraplex_requests_total", adapter="tiny", finish_reason="length") == 2
    for adapter, count in (("tiny", 2), ("other", 1)):
        assert value(found, "loraplex_time_to_first_token_seconds_count", adapter=adapter) == count
        assert value(found, "loraplex_request_queue_time_seconds_count", adapter=adapter) == count
        assert value(found, "loraplex_inter_token_latency_seconds_count", adapter=adapter) == 3 * count
        assert value(found, "loraplex_generation_tokens_total", adapter=adapter) == 4 * count
        assert value(found, "loraplex_prompt_tokens_total", adapter=adapter) == 5 * count
        assert value(found, "loraplex_e2e_request_latency_seconds_count", adapter=adapter) == count
    assert value(found, "loraplex_engine_step_seconds_count") >= 4
    assert value(found, "loraplex_engine_step_batch_tokens_sum") == 4 * (5 + 3)  # prompt + decodes of each
    assert value(found, "loraplex_num_requests_running") == 0
    assert value(found, "loraplex_num_requests_waiting") == 0
    assert value(found, "loraplex_kv_cache_usage_ratio") == 0
    assert value(found, "loraplex_merged_adapter", adapter="tiny") == 1
    assert value(found, "loraplex_request_errors_total", status="404") == 1
    info = [labels for name, labels in found if name == "loraplex_lora_requests_info"]
    assert info == [(("max_lora", "3"), ("running_lora_adapters", ""), ("waiting_lora_adapters", ""))]


async def test_prefix_cache_hits_are_counted_per_adapter_and_reported_in_usage(client):
    body = {"model": "tiny", "prompt": list(range(3, 21)), "max_tokens": 2, "ignore_eos": True, "temperature": 0}
    first = (await client.post("/v1/completions", json=body)).json()
    second = (await client.post("/v1/completions", json=body)).json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 16}  # 4 full blocks of 18 tokens
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    lines = (await client.post("/v1/completions", json=stream)).text.splitlines()
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {")]
    assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 16}
    found = samples((await client.get("/metrics")).text)
    assert value(found, "loraplex_prefix_cache_queries_total", adapter="tiny") == 3 * 18
    assert value(found, "loraplex_prefix_cache_hits_total", adapter="tiny") == 2 * 16
