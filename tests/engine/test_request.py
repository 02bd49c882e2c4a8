"""Generation policy in the engine's request types: checks, fan-out, seeds, default max_tokens, model defaults and
best_of's ranking, whoever the caller."""

from __future__ import annotations

import pytest

from server.engine.generation_defaults import GenerationDefaults
from server.engine.request import GREEDY_BELOW, SamplingRequest
from server.engine.sequence import INT64_MAX
from server.errors import InvalidRequestError

NONE = GenerationDefaults()


@pytest.mark.parametrize(
    ("temperature", "expected"), [(GREEDY_BELOW / 10, 0.0), (GREEDY_BELOW, GREEDY_BELOW), (0, 0.0)]
)
def test_tiny_temperatures_are_greedy(temperature: float, expected: float) -> None:
    params = SamplingRequest(max_tokens=1, temperature=temperature).params(0, 3, 64, NONE)
    assert params.temperature == expected and params.greedy == (expected == 0.0)
    by_default = SamplingRequest(max_tokens=1).params(0, 3, 64, GenerationDefaults(temperature=temperature))
    assert by_default.temperature == expected


def test_fan_out_seeds_each_sample_and_numbers_jobs_by_prompt() -> None:
    request = SamplingRequest(n=2, best_of=3, seed=10, max_tokens=4, temperature=0.7)
    jobs = request.jobs([[1, 2], [3]], 64, NONE)
    assert [job.index for job in jobs] == list(range(6))
    assert [job.prompt_token_ids for job in jobs] == [[1, 2]] * 3 + [[3]] * 3
    assert [job.params.seed for job in jobs] == [10, 11, 12] * 2
    assert {job.params.logprobs for job in jobs} == {0}  # best_of ranks by log-probability


def test_no_seed_stays_unset_and_no_logprobs_without_ranking() -> None:
    jobs = SamplingRequest(n=2, max_tokens=4).jobs([[1]], 64, NONE)
    assert [(job.params.seed, job.params.logprobs) for job in jobs] == [(None, None), (None, None)]


def test_a_seed_whose_samples_overflow_int64_is_refused() -> None:
    SamplingRequest(n=2, seed=INT64_MAX - 1)
    with pytest.raises(InvalidRequestError, match="lower the seed") as error:
        SamplingRequest(n=2, best_of=3, seed=INT64_MAX - 1)
    assert error.value.param == "seed"


@pytest.mark.parametrize(("fields", "param"), [({"n": 0}, "n"), ({"n": 3, "best_of": 2}, "best_of")])
def test_counts_are_checked(fields: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as error:
        SamplingRequest(**fields)
    assert error.value.param == param


@pytest.mark.parametrize(
    ("default_max_tokens", "prompt_len", "expected"), [(None, 10, 54), (16, 10, 16), (16, 60, 4), (None, 64, 1)]
)
def test_default_max_tokens_is_the_rest_of_the_context(
    default_max_tokens: int | None, prompt_len: int, expected: int
) -> None:
    request = SamplingRequest(default_max_tokens=default_max_tokens)
    assert request.params(0, prompt_len, 64, NONE).max_tokens == expected


def test_zero_max_tokens_only_when_the_prompt_is_returned() -> None:
    with pytest.raises(InvalidRequestError) as error:
        SamplingRequest(max_tokens=0).params(0, 3, 64, NONE)
    assert error.value.param == "max_tokens"
    assert SamplingRequest(max_tokens=0, returns_prompt=True).params(0, 3, 64, NONE).max_tokens == 0


def test_min_tokens_over_max_tokens_is_refused() -> None:
    with pytest.raises(InvalidRequestError) as error:
        SamplingRequest(max_tokens=3, min_tokens=4).params(0, 3, 64, NONE)
    assert error.value.param == "min_tokens"


def test_omitted_fields_take_the_model_defaults_then_the_engine_defaults() -> None:
    defaults = GenerationDefaults(temperature=0.2, top_k=40)
    params = SamplingRequest(max_tokens=4, top_p=0.5).params(0, 3, 64, defaults)
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty) == (
        0.2, 0.5, 40, 0.0, 1.0,
    )  # fmt: skip
    given = SamplingRequest(max_tokens=4, temperature=1.0, top_k=-1).params(0, 3, 64, defaults)
    assert (given.temperature, given.top_k) == (1.0, 0)


def test_best_of_with_greedy_sampling_is_refused_even_by_default() -> None:
    with pytest.raises(InvalidRequestError) as error:
        SamplingRequest(best_of=2, max_tokens=4).params(0, 3, 64, GenerationDefaults(temperature=0.0))
    assert error.value.param == "best_of"


def test_most_likely_keeps_each_prompts_n_best_in_order() -> None:
    request = SamplingRequest(n=2, best_of=3)
    scores = {0: -3.0, 1: -1.0, 2: -2.0, 3: -0.5, 4: -9.0, 5: -0.1}  # job index -> total log-probability
    best = request.most_likely(scores, lambda score: score)
    assert best == {0: -1.0, 1: -2.0, 2: -0.1, 3: -0.5}


def test_most_likely_without_best_of_returns_everything() -> None:
    results = {0: "a", 1: "b"}
    assert SamplingRequest(n=2).most_likely(results, len) is results
