"""Through the HTTP API of the real app: requests on an adapter whose numbers overflow fail alone, with a 500 that
names their request id and nothing internal, while the requests beside them (other adapters, the base model,
streamed or not) answer exactly as they do alone."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from server.api import create_app
from server.engine.factory import build_engine
from server.settings import Settings
from tests.helpers import make_fault_store

PROMPTS = {"tiny": [5, 6, 7, 8], "a": [9, 10, 11], "b": [12, 13, 14, 15, 16]}


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory) -> Path:
    return make_fault_store(tiny_model_dir, tmp_path_factory.mktemp("request-faults"))


@pytest.fixture
async def client(tiny_model_dir, store) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(model=tiny_model_dir, adapters_store=store, kv_cache_bytes=2**20, block_size=4,
                        served_model_name="tiny")  # fmt: skip
    app = create_app(settings, build_engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            while (await client.get("/health")).status_code != 200:
                await asyncio.sleep(0.05)
            yield client


def body(model: str, prompt: list[int], **extra: object) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": 10, "min_tokens": 10, "temperature": 0, **extra}


async def streamed_text(client: httpx.AsyncClient, request: dict) -> tuple[str, list[dict]]:
    """The text of a streamed completion and its error events."""
    response = await client.post("/v1/completions", json={**request, "stream": True})
    assert response.status_code == 200
    events = [json.loads(line[6:]) for line in response.text.split("\n\n") if line.startswith("data: {")]
    assert response.text.endswith("data: [DONE]\n\n")
    text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
    return text, [e for e in events if "error" in e]


async def test_overflowing_adapter_fails_alone_with_a_clean_500(client, caplog) -> None:
    alone = {m: (await client.post("/v1/completions", json=body(m, p))).json()["choices"][0]["text"]
             for m, p in PROMPTS.items()}  # fmt: skip
    caplog.set_level(logging.ERROR)
    bad_prompt = [30, 31, 32, 33, 34, 35]
    normal = [client.post("/v1/completions", json=body(m, p)) for m, p in PROMPTS.items()]
    streamed = [streamed_text(client, body(m, p)) for m, p in PROMPTS.items()]
    bad = [client.post("/v1/completions", json=body("overflow", bad_prompt)),
           streamed_text(client, body("overflow", bad_prompt))]  # fmt: skip
    results = await asyncio.gather(*bad, *normal, *streamed)
    failed, (bad_text, bad_events) = results[0], results[1]
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert error["type"] == "internal_error"
    request_id = error["message"].split("request ")[1].split(" ")[0]
    assert request_id.startswith("cmpl-") and "NaN" not in error["message"] and "Error" not in error["message"]
    assert bad_text == "" and len(bad_events) == 1 and "failed inside the engine" in bad_events[0]["error"]["message"]
    assert f"request {request_id} failed: sampling failed" in caplog.text  # the log has the detail under the id
    for (model, _), response in zip(PROMPTS.items(), results[2:5], strict=True):
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == alone[model]
    for (model, _), (text, events) in zip(PROMPTS.items(), results[5:], strict=True):
        assert text == alone[model] and not events
    assert (await client.get("/health")).status_code == 200
    metrics = (await client.get("/metrics")).text
    assert "loraplex_engine_request_failures_total 2.0" in metrics
    assert "loraplex_engine_step_failures_total 0.0" in metrics
    assert "loraplex_adapter_slot_users 0.0" in metrics and "loraplex_kv_cache_usage_ratio 0.0" in metrics
