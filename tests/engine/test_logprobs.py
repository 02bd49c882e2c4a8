"""Prompt and sampled log-probabilities in a concurrent mixed batch, exact against transformers and PEFT."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.engine.factory import build_engine
from server.engine.logprobs import TokenLogprob, token_logprobs
from server.engine.sequence import SamplingParams
from server.settings import Settings
from tests.helpers import make_adapter_store, peft_logits

ADAPTERS = {
    "lora": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear"),
}
TOP = 5


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory):
    return make_adapter_store(tiny_model_dir, tmp_path_factory.mktemp("store"), ADAPTERS)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, store):
    # 16 tokens a step: the 30-token prompts are prefilled in chunks next to other requests' decodes.
    settings = Settings(model=tiny_model_dir, adapters_store=store, kv_cache_bytes=2**20, block_size=4,
                        max_num_batched_tokens=16, dtype="float32")  # fmt: skip
    engine = build_engine(settings)
    yield engine
    engine.shutdown()


def _prompt(i: int, length: int) -> list[int]:
    return [3 + (13 * i + 5 * j) % 250 for j in range(length)]


async def _run(engine, prompt, params, adapter, request_id):
    return [out async for out in engine.generate(prompt, params, adapter, request_id)]


def _assert_matches(got: list[TokenLogprob], want: torch.Tensor, tokens: list[int]) -> None:
    """`want: [len(tokens), V]` reference log-probabilities of the positions that scored `tokens`."""
    assert [g.token_id for g in got] == tokens
    torch.testing.assert_close(torch.tensor([g.logprob for g in got]), want.gather(-1, torch.tensor(tokens)[:, None])
                               .squeeze(-1), atol=1e-4, rtol=0)  # fmt: skip
    best_values, best_ids = want.topk(TOP, dim=-1)
    for g, values, ids in zip(got, best_values, best_ids, strict=True):
        assert [t for t, _ in g.top] == ids.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in g.top]), values, atol=1e-4, rtol=0)


def test_prompt_and_sampled_logprobs_match_peft_in_a_mixed_batch(engine, tiny_model_dir, store):
    adapters = [None, "lora", "dora", "lora", None, "dora"]
    prompts = [_prompt(i, 30 - 3 * i) for i in range(len(adapters))]
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=7, logprobs=TOP, prompt_logprobs=TOP, ignore_eos=True)

    async def burst():
        jobs = [_run(engine, p, params, a, f"lp{i}") for i, (a, p) in enumerate(zip(adapters, prompts, strict=True))]
        return await asyncio.gather(*jobs)

    for adapter, prompt, outs in zip(adapters, prompts, asyncio.run(burst()), strict=True):
        output = [t for out in outs for t in out.token_ids]
        want = torch.log_softmax(peft_logits(tiny_model_dir, store / adapter if adapter else None, prompt + output), -1)
        assert outs[0].prompt_logprobs is not None and all(out.prompt_logprobs is None for out in outs[1:])
        _assert_matches(outs[0].prompt_logprobs, want[: len(prompt) - 1], prompt[1:])
        _assert_matches([lp for out in outs for lp in out.logprobs], want[len(prompt) - 1 : -1], output)


def test_max_tokens_zero_scores_the_prompt_without_generating(engine, tiny_model_dir):
    prompt = _prompt(9, 21)
    outs = asyncio.run(_run(engine, prompt, SamplingParams(max_tokens=0, prompt_logprobs=0), None, "score"))
    (out,) = outs
    assert out.finished and out.finish_reason.value == "length" and out.token_ids == [] and out.num_output_tokens == 0
    want = torch.log_softmax(peft_logits(tiny_model_dir, None, prompt), -1)[:-1]
    got = torch.tensor([lp.logprob for lp in out.prompt_logprobs])
    torch.testing.assert_close(got, want.gather(-1, torch.tensor(prompt[1:])[:, None]).squeeze(-1), atol=1e-4, rtol=0)
    assert all(lp.top == () for lp in out.prompt_logprobs)
    assert engine.core.scheduler.block_manager.num_used_blocks == 0


def test_requests_without_logprobs_get_none(engine):
    outs = asyncio.run(_run(engine, _prompt(3, 5), SamplingParams(max_tokens=3, temperature=0.0), None, "plain"))
    assert all(out.logprobs is None and out.prompt_logprobs is None for out in outs)


def test_token_logprobs_trims_each_rows_alternatives():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 2.0, 1.0]])
    got = token_logprobs(logits, torch.tensor([0, 0]), [2, 0])
    logp = torch.log_softmax(logits, -1)
    assert got[0].top == ((2, pytest.approx(logp[0, 2].item())), (1, pytest.approx(logp[0, 1].item())))
    assert got[1].top == () and got[1].logprob == pytest.approx(logp[1, 0].item())
