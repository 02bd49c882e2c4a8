"""The official `openai` client works against the app, streaming included, and maps our errors."""

from __future__ import annotations

import openai
import pytest
from fake_engine import FakeEngine


async def test_completion(oai: openai.AsyncOpenAI) -> None:
    completion = await oai.completions.create(model="sql-writer", prompt=["abc", "de"], max_tokens=2, n=2, seed=3)
    assert completion.model == "sql-writer"
    assert [(c.index, c.text, c.finish_reason) for c in completion.choices] == [
        (0, "ab", "length"),
        (1, "ab", "length"),
        (2, "de", "stop"),
        (3, "de", "stop"),
    ]
    assert completion.usage is not None and completion.usage.total_tokens == 5 + 8


async def test_chat_completion(oai: openai.AsyncOpenAI) -> None:
    completion = await oai.chat.completions.create(
        model="base-model",
        messages=[{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "u"}]}],
        max_completion_tokens=3,
        stop=["zzz"],
        temperature=0,
        extra_body={"top_k": 5, "min_tokens": 1, "ignore_eos": False},
    )
    (choice,) = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == "<sy"
    assert choice.finish_reason == "length"


async def test_streaming_completion(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.completions.create(
        model="base-model", prompt="hello", max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "hell"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


async def test_streaming_chat(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    stream = await oai.chat.completions.create(
        model="poet", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=100
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "<user>hi<assistant>"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert engine.submitted[0].adapter == "poet"


async def test_models(oai: openai.AsyncOpenAI) -> None:
    models = [model async for model in oai.models.list()]
    assert [m.id for m in models] == ["base-model", "sql-writer", "poet"]
    assert (await oai.models.retrieve("poet")).owned_by == "loraplex"


async def test_errors_map_to_client_exceptions(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    with pytest.raises(openai.NotFoundError):
        await oai.completions.create(model="missing", prompt="a")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        await oai.completions.create(model="base-model", prompt="a", temperature=9)
    with pytest.raises(openai.BadRequestError, match="ignore_eos") as wrong_type:  # not UnprocessableEntityError
        await oai.completions.create(model="base-model", prompt="a", extra_body={"ignore_eos": "yes"})
    assert wrong_type.value.body["param"] == "ignore_eos"
    engine.queue_full = True
    with pytest.raises(openai.RateLimitError):
        await oai.chat.completions.create(model="base-model", messages=[{"role": "user", "content": "a"}], stream=True)


async def test_error_mid_stream_raises_in_the_client(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    engine.fail_after = 2
    stream = await oai.completions.create(model="base-model", prompt="abcdef", stream=True)
    with pytest.raises(openai.APIError, match="device fell over"):
        async for _ in stream:
            pass
