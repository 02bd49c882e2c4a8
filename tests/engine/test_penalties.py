"""Penalties, logit bias, min-p and stop token ids: against reference loops and Hugging Face's processors, row-local."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers.generation.logits_process import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor

from server.engine.factory import build_engine
from server.engine.penalties import apply_min_p, apply_penalties, validate_token_ids
from server.engine.sampler import Sampler, SamplingRow
from server.engine.sequence import SamplingParams
from server.errors import InvalidRequestError
from server.settings import Settings

EOS = (2,)
PROMPT, OUTPUT = [3, 4, 4, 9], [9, 9, 7, 3, 11]


def _logits(rows: int = 3, vocab: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_presence_and_frequency_follow_openai_over_generated_tokens() -> None:
    logits = _logits(1)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    got = apply_penalties(logits, [params], [(PROMPT, OUTPUT)])
    want = logits.clone()
    for token in set(OUTPUT):
        want[0, token] -= 0.5 + 0.25 * OUTPUT.count(token)  # prompt-only token 4 is untouched
    torch.testing.assert_close(got, want)


def test_repetition_matches_hugging_face_over_prompt_and_output() -> None:
    logits = _logits(1)
    got = apply_penalties(logits, [SamplingParams(repetition_penalty=1.3)], [(PROMPT, OUTPUT)])
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([PROMPT + OUTPUT]), logits.clone())
    torch.testing.assert_close(got, want)


def test_logit_bias_adds_and_bans() -> None:
    logits = torch.zeros(2, 10)
    logits[:, 5] = 10.0
    params = [SamplingParams(temperature=0.0, logit_bias=((5, -100.0), (8, 1.5))), SamplingParams(temperature=0.0)]
    rows = [SamplingRow(p, None, 0) for p in params]
    assert Sampler(EOS).sample(logits, rows) == [8, 5]
    assert logits[0, 5] == 10.0  # the caller's logits are never modified


def test_rows_that_do_not_ask_are_untouched() -> None:
    logits = _logits()
    plain = [SamplingParams()] * 3
    assert apply_penalties(logits, plain, [(PROMPT, OUTPUT)] * 3) is logits
    asking = [SamplingParams(), SamplingParams(frequency_penalty=1.0, logit_bias=((1, 3.0),)), SamplingParams()]
    got = apply_penalties(logits, asking, [(PROMPT, OUTPUT)] * 3)
    assert torch.equal(got[[0, 2]], logits[[0, 2]]) and not torch.equal(got[1], logits[1])


@pytest.mark.parametrize("min_p", [0.05, 0.3])
def test_min_p_matches_hugging_face(min_p: float) -> None:
    logits = _logits(4, 50)
    want = MinPLogitsWarper(min_p)(torch.zeros(4, 1, dtype=torch.long), logits.clone())
    got = apply_min_p(logits, torch.full((4,), min_p))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(apply_min_p(logits, torch.zeros(4)), logits)


def test_stop_token_ids_are_banned_before_min_tokens() -> None:
    logits = torch.zeros(2, 10)
    logits[:, 6] = 20.0
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(6,))
    rows = [SamplingRow(params, None, 1), SamplingRow(params, None, 2)]
    tokens = Sampler(EOS).sample(logits, rows)
    assert tokens[0] != 6 and tokens[1] == 6


def test_seeded_rows_with_every_control_are_batch_invariant() -> None:
    logits = _logits(3, 64, seed=5)
    controls = dict(presence_penalty=0.4, frequency_penalty=0.2, repetition_penalty=1.2, logit_bias=((7, 2.0),),
                    min_p=0.02, top_k=20, top_p=0.9, temperature=0.8)  # fmt: skip

    def rows(seed: int) -> list[SamplingRow]:
        return [SamplingRow(SamplingParams(**controls), torch.Generator().manual_seed(seed), 5, PROMPT, OUTPUT)]

    alone = [Sampler(EOS).sample(logits[1:2], rows(11)) for _ in range(2)]
    others = [SamplingRow(SamplingParams(temperature=0.0), None, 0),
              SamplingRow(SamplingParams(min_p=0.5), torch.Generator().manual_seed(3), 0)]  # fmt: skip
    mixed = Sampler(EOS).sample(logits, [others[0], *rows(11), others[1]])
    assert alone[0] == alone[1] == [mixed[1]]


def test_out_of_vocabulary_token_ids_are_refused() -> None:
    with pytest.raises(InvalidRequestError) as error:
        validate_token_ids(SamplingParams(logit_bias=((100, 1.0),)), 100)
    assert error.value.param == "logit_bias"
    with pytest.raises(InvalidRequestError) as error:
        validate_token_ids(SamplingParams(stop_token_ids=(1, -1)), 100)
    assert error.value.param == "stop_token_ids"
    validate_token_ids(SamplingParams(logit_bias=((99, -100.0),), stop_token_ids=(0,)), 100)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = build_engine(Settings(model=tiny_model_dir, kv_cache_bytes=2**20, block_size=4))
    yield engine
    engine.shutdown()


def _generate(engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    async def one(i: int, prompt: list[int], params: SamplingParams) -> list[int]:
        return [t async for out in engine.generate(prompt, params, None, f"p{i}") for t in out.token_ids]

    async def all_jobs():
        return await asyncio.gather(*(one(i, prompt, params) for i, (prompt, params) in enumerate(jobs)))

    return asyncio.run(all_jobs())


def test_engine_stops_at_a_stop_token_id_and_keeps_it_out_of_the_text(engine) -> None:
    prompt = [5, 6, 7, 8]
    (tokens,) = _generate(engine, [(prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))])
    stop = tokens[2]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, stop_token_ids=(stop, 1))

    async def run():
        return [out async for out in engine.generate(prompt, params, None, "stopped")]

    stopped = asyncio.run(run())
    assert [t for out in stopped for t in out.token_ids] == tokens[: tokens.index(stop) + 1]
    assert stopped[-1].finish_reason.value == "stop"
    assert "".join(out.text for out in stopped) == engine.decode(tokens[: tokens.index(stop)])


def test_seeded_request_with_every_control_repeats_alone_and_in_a_batch(engine) -> None:
    bias = ((40, 3.0), (41, -100.0))
    params = SamplingParams(max_tokens=12, seed=4, ignore_eos=True, presence_penalty=0.6, frequency_penalty=0.3,
                            repetition_penalty=1.3, logit_bias=bias, min_p=0.01, top_p=0.95)  # fmt: skip
    prompt = [9, 40, 41, 9, 12]
    alone = _generate(engine, [(prompt, params)] * 2)
    others = [([3, 4, 5], SamplingParams(max_tokens=8, temperature=0.0)), ([7] * 9, SamplingParams(max_tokens=5))]
    mixed = _generate(engine, [others[0], (prompt, params), others[1]])
    assert alone[0] == alone[1] == mixed[1]
    assert 41 not in alone[0]
    plain = _generate(engine, [(prompt, SamplingParams(max_tokens=12, seed=4, ignore_eos=True))])[0]
    assert plain != alone[0]  # the controls did change what was sampled
