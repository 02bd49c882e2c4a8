"""POST /v1/completions, non-streaming: shapes, prompt forms, n, defaults and sampling fields."""

from __future__ import annotations

import httpx
import pytest
from fake_engine import FakeEngine


async def complete(client: httpx.AsyncClient, **body: object) -> httpx.Response:
    return await client.post("/v1/completions", json={"model": "base-model", **body})


async def test_response_shape(client: httpx.AsyncClient) -> None:
    response = await complete(client, prompt="hello", max_tokens=3)
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("cmpl-") and len(body["id"]) == len("cmpl-") + 32
    assert body["object"] == "text_completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "base-model"
    assert body["choices"] == [{"index": 0, "text": "hel", "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 3,
        "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_stop_finish_reason_when_the_model_ends(client: httpx.AsyncClient) -> None:
    body = (await complete(client, prompt="hey", max_tokens=10)).json()
    assert body["choices"][0]["text"] == "hey"
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_stop_strings_cut_the_text(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    body = (await complete(client, prompt="abcdef", max_tokens=10, stop=["zz", "d"])).json()
    assert body["choices"][0] == {"index": 0, "text": "abc", "logprobs": None, "finish_reason": "stop"}
    assert engine.submitted[0].params.stop == ("zz", "d")


async def test_single_stop_string(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    await complete(client, prompt="abc", stop="b")
    assert engine.submitted[0].params.stop == ("b",)


async def test_model_is_echoed_and_adapter_routed(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    body = (await complete(client, model="sql-writer", prompt="x")).json()
    assert body["model"] == "sql-writer"
    assert engine.submitted[0].adapter == "sql-writer"
    await complete(client, prompt="x")
    assert engine.submitted[1].adapter is None


@pytest.mark.parametrize(
    ("prompt", "texts"),
    [
        ("ab", ["ab"]),
        (["ab", "cde"], ["ab", "cde"]),
        ([104, 105], ["hi"]),
        ([[104, 105], [111]], ["hi", "o"]),
    ],
)
async def test_prompt_forms(client: httpx.AsyncClient, prompt: object, texts: list[str]) -> None:
    body = (await complete(client, prompt=prompt, max_tokens=5)).json()
    assert [c["index"] for c in body["choices"]] == list(range(len(texts)))
    assert [c["text"] for c in body["choices"]] == texts
    prompt_tokens = sum(map(len, texts))
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": prompt_tokens,
        "total_tokens": 2 * prompt_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_n_makes_one_engine_request_per_choice(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    body = (await complete(client, prompt=["ab", "c"], n=2, seed=10, max_tokens=4)).json()
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, "ab"), (1, "ab"), (2, "c"), (3, "c")]
    assert body["usage"]["prompt_tokens"] == 3  # each prompt counted once
    assert body["usage"]["completion_tokens"] == 6
    assert [s.params.seed for s in engine.submitted] == [10, 11, 10, 11]
    assert len({s.request_id for s in engine.submitted}) == 4
    assert all(s.request_id.startswith(body["id"]) for s in engine.submitted)


async def test_no_seed_stays_unset(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    await complete(client, prompt="ab", n=2)
    assert [s.params.seed for s in engine.submitted] == [None, None]


async def test_default_max_tokens_is_16_capped_by_the_context(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    await complete(client, prompt="a")
    await complete(client, prompt="a" * 120)
    assert [s.params.max_tokens for s in engine.submitted] == [16, 8]


async def test_sampling_fields_reach_the_engine(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    response = await complete(
        client, prompt="abc", temperature=0, top_p=0.5, top_k=-1, max_tokens=5, min_tokens=2, ignore_eos=True
    )
    assert response.status_code == 200
    params = engine.submitted[0].params
    assert (params.temperature, params.top_p, params.top_k) == (0.0, 0.5, 0)
    assert (params.max_tokens, params.min_tokens, params.ignore_eos) == (5, 2, True)
    assert response.json()["choices"][0] == {"index": 0, "text": "abcab", "logprobs": None, "finish_reason": "length"}


async def test_null_sampling_fields_take_defaults(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    response = await complete(client, prompt="abc", temperature=None, top_p=None, n=None, stop=None, seed=None)
    assert response.status_code == 200
    params = engine.submitted[0].params
    assert (params.temperature, params.top_p, params.top_k, params.stop) == (1.0, 1.0, 0, ())


async def test_unknown_fields_are_refused_and_user_is_ignored(client: httpx.AsyncClient) -> None:
    assert (await complete(client, prompt="abc", user="someone")).status_code == 200
    response = await complete(client, prompt="abc", some_vendor_field={"x": 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "some_vendor_field"


async def test_neutral_values_of_unsupported_fields_pass(client: httpx.AsyncClient) -> None:
    response = await complete(
        client, prompt="a", echo=False, best_of=1, suffix=None, presence_penalty=0, frequency_penalty=0.0, logit_bias={}
    )
    assert response.status_code == 200
