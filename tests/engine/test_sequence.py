"""SamplingParams check themselves when built, whoever builds them: an out-of-range value is an InvalidRequestError
naming its field."""

from __future__ import annotations

import pytest

from server.engine.sequence import INT64_MAX, SamplingParams
from server.errors import InvalidRequestError


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"logit_bias": ((3, 101.0),)}, "logit_bias"),
        ({"logit_bias": ((-1, 1.0),)}, "logit_bias"),
        ({"seed": INT64_MAX + 1}, "seed"),
        ({"seed": True}, "seed"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"min_tokens": -2}, "min_tokens"),
        ({"stop": ("",)}, "stop"),
        ({"stop_token_ids": (-5,)}, "stop_token_ids"),
    ],
)
def test_sampling_params_refuse_out_of_range_values(fields: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as error:
        SamplingParams(**fields)
    assert error.value.param == param


def test_sampling_params_take_the_bounds_themselves() -> None:
    params = SamplingParams(max_tokens=0, top_p=1.0, min_p=1.0, presence_penalty=-2.0, logprobs=20, seed=-(2**63))
    assert params.max_tokens == 0 and params.seed == -(2**63)
