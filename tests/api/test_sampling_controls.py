"""Penalties, logit bias, min-p, stop token ids and best_of through the HTTP API and the official client."""

from __future__ import annotations

import openai
from fake_engine import FakeEngine

from server.engine.sequence import SamplingParams

CONTROLS = dict(presence_penalty=0.5, frequency_penalty=-0.25, logit_bias={"7": -100, "42": 2.5}, seed=9)
EXTRAS = dict(repetition_penalty=1.2, min_p=0.05, stop_token_ids=[5, 6])


def _assert_controls(params: SamplingParams) -> None:
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -0.25, 1.2)
    assert params.logit_bias == ((7, -100.0), (42, 2.5))
    assert (params.min_p, params.stop_token_ids, params.seed) == (0.05, (5, 6), 9)


async def test_completion_controls_reach_the_engine(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    await oai.completions.create(model="base-model", prompt="ab", max_tokens=2, extra_body=EXTRAS, **CONTROLS)
    _assert_controls(engine.submitted[0].params)


async def test_streamed_chat_controls_reach_the_engine(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    stream = await oai.chat.completions.create(
        model="poet", messages=[{"role": "user", "content": "a"}], stream=True, extra_body=EXTRAS, **CONTROLS
    )
    assert [chunk async for chunk in stream]
    _assert_controls(engine.submitted[0].params)


async def test_defaults_ask_for_nothing(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    await oai.completions.create(model="base-model", prompt="ab", max_tokens=2)
    params = engine.submitted[0].params
    assert not params.has_penalties and params.logit_bias == () and params.min_p == 0.0 and params.logprobs is None


async def test_best_of_returns_the_most_likely_samples(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    # The fake scores sample i (seed 1 + i) -0.25 * (1 + (1 + i) % 3) per token: sample 2 first, then sample 0.
    completion = await oai.completions.create(
        model="base-model", prompt=["ab", "cd"], max_tokens=2, n=2, best_of=3, seed=1, logprobs=0
    )
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert [c.logprobs.token_logprobs for c in completion.choices if c.logprobs] == [[-0.25] * 2, [-0.5] * 2] * 2
    assert [c.text for c in completion.choices] == ["ab", "ab", "cd", "cd"]
    assert completion.usage is not None and completion.usage.completion_tokens == 12  # every sample is counted
    assert len(engine.submitted) == 6


async def test_best_of_ranks_without_reporting_logprobs(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    completion = await oai.completions.create(model="base-model", prompt="ab", max_tokens=2, best_of=2)
    assert len(completion.choices) == 1 and completion.choices[0].logprobs is None
    assert [s.params.logprobs for s in engine.submitted] == [0, 0]


async def test_chat_best_of_returns_the_most_likely_samples(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    # As above: sample 2 (seed 3) scores -0.25 per token, sample 0 (seed 1) -0.5, sample 1 (seed 2) -0.75.
    reply = await oai.chat.completions.create(
        model="poet", messages=[{"role": "user", "content": "ab"}], max_tokens=2, n=2, seed=1, logprobs=True,
        extra_body={"best_of": 3},
    )  # fmt: skip
    assert [c.index for c in reply.choices] == [0, 1]
    assert [[t.logprob for t in c.logprobs.content] for c in reply.choices if c.logprobs] == [[-0.25] * 2, [-0.5] * 2]
    assert reply.usage is not None and reply.usage.completion_tokens == 6  # every sample is counted
    assert [s.params.seed for s in engine.submitted] == [1, 2, 3]
