"""The model's generation defaults through the HTTP API: fields a request leaves out (or sends as null) take
them, fields it gives win, and /v1/models shows them on the base model and its adapters."""

from __future__ import annotations

import httpx
import openai
import pytest
from fake_engine import FakeEngine

from server.engine.generation_defaults import GenerationDefaults

DEFAULTS = GenerationDefaults(temperature=0.2, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1)
CHAT = [{"role": "user", "content": "ab"}]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(generation_defaults=DEFAULTS)


async def complete(client: httpx.AsyncClient, **body: object) -> httpx.Response:
    return await client.post("/v1/completions", json={"model": "base-model", **body})


def _sampling(engine: FakeEngine) -> tuple[float, float, int, float, float]:
    params = engine.submitted[-1].params
    return params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty


async def test_omitted_fields_take_the_model_defaults(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    await oai.chat.completions.create(model="poet", messages=CHAT, max_tokens=2)
    assert _sampling(engine) == (0.2, 0.9, 40, 0.05, 1.1)
    await oai.completions.create(model="base-model", prompt="ab", max_tokens=2)
    assert _sampling(engine) == (0.2, 0.9, 40, 0.05, 1.1)


async def test_null_fields_take_the_model_defaults(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    nulls = dict.fromkeys(("temperature", "top_p", "top_k", "min_p", "repetition_penalty"))
    assert (await complete(client, prompt="ab", max_tokens=2, **nulls)).status_code == 200
    assert _sampling(engine) == (0.2, 0.9, 40, 0.05, 1.1)


async def test_given_fields_win_over_the_defaults(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    extra = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}  # -1 disables top-k even where the model sets it
    await oai.chat.completions.create(
        model="poet", messages=CHAT, max_tokens=2, temperature=1.0, top_p=1.0, extra_body=extra
    )
    assert _sampling(engine) == (1.0, 1.0, 0, 0.0, 1.0)


async def test_tiny_temperature_is_greedy_whatever_the_default(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    await oai.completions.create(model="base-model", prompt="ab", max_tokens=2, temperature=1e-6)
    assert engine.submitted[-1].params.temperature == 0.0 and engine.submitted[-1].params.greedy


async def test_models_show_the_defaults(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()["data"]
    assert [model["generation_defaults"] for model in models] == [DEFAULTS.as_dict()] * 3
    assert (await client.get("/v1/models/poet")).json()["generation_defaults"]["temperature"] == 0.2


async def test_best_of_with_a_greedy_default_is_refused(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.generation_defaults = GenerationDefaults(temperature=0.0)
    response = await complete(client, prompt="ab", max_tokens=2, best_of=2)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "best_of"
    assert not engine.submitted
