"""Log-probabilities and prompt scoring through the HTTP API and the official client, whole and streamed.

The fake engine scores every token -0.25 with alternatives the next code points at -1, -2, ... (see fake_engine).
"""

from __future__ import annotations

import httpx
import openai
from api_helpers import sse_payloads
from fake_engine import FakeEngine


async def test_completion_logprobs_legacy_shape(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    completion = await oai.completions.create(model="base-model", prompt="abc", max_tokens=2, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == ["a", "b"]
    assert logprobs.token_logprobs == [-0.25, -0.25]
    assert logprobs.top_logprobs == [{"a": -0.25, "b": -1.0, "c": -2.0}, {"b": -0.25, "c": -1.0, "d": -2.0}]
    assert logprobs.text_offset == [0, 1]
    assert (engine.submitted[0].params.logprobs, engine.submitted[0].params.prompt_logprobs) == (2, None)


async def test_echo_with_logprobs_scores_the_prompt(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    completion = await oai.completions.create(model="poet", prompt="xy", max_tokens=1, echo=True, logprobs=0)
    choice = completion.choices[0]
    assert choice.text == "xyx"
    assert choice.logprobs is not None
    assert choice.logprobs.tokens == ["x", "y", "x"]
    assert choice.logprobs.token_logprobs == [None, -0.25, -0.25]
    assert choice.logprobs.top_logprobs == [None, {"y": -0.25}, {"x": -0.25}]
    assert choice.logprobs.text_offset == [0, 1, 2]
    assert engine.submitted[0].params.prompt_logprobs == 0


async def test_max_tokens_zero_with_echo_only_scores(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    completion = await oai.completions.create(
        model="base-model", prompt=[[104, 105], [104, 111]], max_tokens=0, echo=True, logprobs=1
    )
    assert [c.text for c in completion.choices] == ["hi", "ho"]
    assert [c.logprobs.token_logprobs for c in completion.choices if c.logprobs] == [[None, -0.25]] * 2
    assert completion.usage is not None and completion.usage.completion_tokens == 0
    assert [s.params.max_tokens for s in engine.submitted] == [0, 0]


async def test_echo_without_logprobs_returns_the_prompt(oai: openai.AsyncOpenAI) -> None:
    completion = await oai.completions.create(model="base-model", prompt="hey", max_tokens=2, echo=True)
    assert completion.choices[0].text == "heyhe" and completion.choices[0].logprobs is None


async def test_streamed_completion_carries_logprobs_and_offsets(client: httpx.AsyncClient) -> None:
    body = {"model": "base-model", "prompt": "abc", "max_tokens": 3, "logprobs": 1, "echo": True, "stream": True}
    events = sse_payloads(await client.post("/v1/completions", json=body))
    choices = [event["choices"][0] for event in events]
    assert "".join(c["text"] for c in choices) == "abcabc"
    assert [t for c in choices for t in c["logprobs"]["tokens"]] == list("abcabc")
    assert [o for c in choices for o in c["logprobs"]["text_offset"]] == [0, 1, 2, 3, 4, 5]
    assert choices[0]["logprobs"]["token_logprobs"][0] is None
    assert choices[-1]["finish_reason"] == "stop"


async def test_chat_logprobs_shape(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    completion = await oai.chat.completions.create(
        model="base-model", messages=[{"role": "user", "content": "é"}], max_tokens=2, logprobs=True, top_logprobs=1
    )
    content = completion.choices[0].logprobs.content
    assert [(c.token, c.logprob, c.bytes) for c in content] == [("<", -0.25, [60]), ("u", -0.25, [117])]
    assert [[(t.token, t.logprob) for t in c.top_logprobs] for c in content] == [[("=", -1.0)], [("v", -1.0)]]
    assert engine.submitted[0].params.logprobs == 1 and engine.submitted[0].params.prompt_logprobs is None


async def test_chat_logprobs_without_top(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    completion = await oai.chat.completions.create(
        model="base-model", messages=[{"role": "user", "content": "a"}], max_tokens=1, logprobs=True
    )
    assert completion.choices[0].logprobs.content[0].top_logprobs == []
    assert engine.submitted[0].params.logprobs == 0


async def test_chat_without_logprobs_has_none(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    completion = await oai.chat.completions.create(model="base-model", messages=[{"role": "user", "content": "a"}])
    assert completion.choices[0].logprobs is None and engine.submitted[0].params.logprobs is None


async def test_streamed_chat_carries_logprobs(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="base-model",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    )
    chunks = [chunk async for chunk in stream]
    content = [c for chunk in chunks for choice in chunk.choices if choice.logprobs for c in choice.logprobs.content]
    assert [c.token for c in content] == ["<", "u", "s"]
    assert all(len(c.top_logprobs) == 2 for c in content)
