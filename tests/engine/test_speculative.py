"""Prompt lookup speculation: exact against decoding one token per step, in mixed-adapter batches."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import torch

from server import cli
from server.adapters.registry import AdapterRegistry
from server.api import create_app
from server.api.sampling import sampling_request
from server.api.schemas import ChatCompletionRequest
from server.engine.block_manager import ROOT_HASH, BlockManager, block_hash
from server.engine.factory import build_core, build_engine
from server.engine.generation_defaults import GenerationDefaults
from server.engine.llm_engine import LLMEngine
from server.engine.sampler import Sampler, SamplingRow
from server.engine.scheduler import ScheduledSequence, Scheduler, SchedulerConfig
from server.engine.sequence import FinishReason, SamplingParams, Sequence
from server.engine.speculative.acceptance import accepted_tokens
from server.engine.speculative.config import SpeculativeConfig, parse_speculative_config
from server.engine.speculative.ngram import PromptLookup, propose_ngram
from server.engine.speculative.policy import EXPLORE_EVERY, EXPLORE_MAX, SpeculationPolicy
from server.engine.speculative.speculator import Speculator
from server.engine.structured import GrammarSpec
from server.errors import ConfigurationError
from server.metrics import Metrics
from server.settings import Settings
from tests.deploy.test_dashboard_layout import DASHBOARD
from tests.helpers import make_adapter_store, peft_greedy

NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}'
LOOP = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]  # repeats, so proposals exist from the first decode step
GREEDY = SamplingParams(max_tokens=24, min_tokens=24, temperature=0.0)
REGEX = GrammarSpec("regex", r"[a-c]{2,4}-\d{3}", "structured_outputs.regex")
PENALISED = SamplingParams(
    max_tokens=20, temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5, logit_bias=((6, 3.0),)
)


def test_config_parses_vllm_spelling_and_refuses_bad_ones() -> None:
    assert parse_speculative_config(NGRAM) == SpeculativeConfig(4, 1, 3)
    assert parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 5}') == (
        SpeculativeConfig(2, 5, 5)
    )
    for bad, words in [
        ("not json", "not JSON"),
        ("[1]", "JSON object"),
        ('{"method": "eagle", "num_speculative_tokens": 2, "prompt_lookup_max": 2}', "not supported"),
        ('{"method": "ngram", "prompt_lookup_max": 2}', "needs num_speculative_tokens"),
        ('{"method": "ngram", "num_speculative_tokens": 0, "prompt_lookup_max": 2}', "positive integer"),
        ('{"method": "ngram", "num_speculative_tokens": 99, "prompt_lookup_max": 2}', "at most"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}', "above"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2, "x": 1}', "unknown keys"),
        ('{"method": "ngram", "num_speculative_tokens": 2}', "needs prompt_lookup_min"),
    ]:
        with pytest.raises(ConfigurationError, match=words):
            parse_speculative_config(bad)
    with pytest.raises(ValueError, match="above"):
        Settings(speculative_config='{"num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}')


def test_ngram_proposes_what_followed_the_latest_longest_match() -> None:
    tokens = [1, 2, 3, 9, 1, 2, 3, 4, 5, 6, 0, 2, 3]
    assert propose_ngram(tokens, 3, 1, 3) == [4, 5, 6]  # "2 3" last seen before 4 5 6 (the latest match)
    assert propose_ngram(tokens, 2, 3, 3) == []  # "0 2 3" never occurred before
    assert propose_ngram(tokens, 0, 1, 3) == []
    assert propose_ngram([7, 7], 4, 1, 2) == [7]  # a match may not run into the suffix itself
    assert propose_ngram([1, 2, 3], 4, 1, 2) == []


def test_acceptance_keeps_the_matching_prefix_and_a_bonus_token() -> None:
    assert accepted_tokens([4, 5, 6], [4, 5, 6, 7]) == [4, 5, 6, 7]
    assert accepted_tokens([4, 5, 6], [4, 9, 6, 7]) == [4, 9]
    assert accepted_tokens([4, 5, 6], [1, 5, 6, 7]) == [1]
    with pytest.raises(ValueError):
        accepted_tokens([4], [4])


def test_a_proposal_is_kept_with_the_target_probability_and_otherwise_the_target_draws_without_it() -> None:
    """The point-mass draft's rejection sampling, statistically: the first kept token has the target distribution."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    target = torch.softmax(logits[0], dim=-1)
    params = SamplingParams(temperature=1.0)
    sampler = Sampler([])
    generator = torch.Generator().manual_seed(1234)
    draws = 6000
    counts = torch.zeros(5)
    kept_proposal = 0
    for _ in range(draws):
        token = sampler.sample(logits, [SamplingRow(params, generator, 0)])[0]
        first = accepted_tokens([1], [token, 0])[0]  # proposal 1; the second row's token is irrelevant here
        counts[first] += 1
        kept_proposal += first == 1
    chi2 = float((((counts - draws * target) ** 2) / (draws * target)).sum())
    assert chi2 < 20.5  # 4 degrees of freedom, p = 0.0004
    assert abs(kept_proposal / draws - float(target[1])) < 0.02


ADAPTERS = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "wide": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "o_proj"]),
}


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory):
    return make_adapter_store(tiny_model_dir, tmp_path_factory.mktemp("spec-store"), ADAPTERS)


def _core(model_dir, store, speculative: str | None, **extra) -> Iterator[tuple[LLMEngine, AdapterRegistry]]:
    settings = Settings(
        model=model_dir, adapters_store=store, kv_cache_bytes=2**20, block_size=4, max_loras=4,
        speculative_config=speculative, **extra,
    )  # fmt: skip
    engine, registry, _ = build_core(settings, Metrics(10, 4))
    yield engine, registry
    registry.shutdown()


def _run(core: LLMEngine, registry: AdapterRegistry, jobs: list[tuple[str, list[int], SamplingParams, str | None]]):
    keys = {rid: asyncio.run(registry.acquire(adapter)) if adapter else None for rid, _, _, adapter in jobs}
    outputs: dict[str, list] = {}
    for rid, prompt, params, _ in jobs:
        core.add_request(rid, prompt, params, keys[rid])
    for _ in range(300):
        if not core.has_work:
            break
        for out in core.step():
            outputs.setdefault(out.request_id, []).append(out)
        for seq in core.scheduler.running:  # rejected proposals' blocks are given back within the step
            assert len(seq.block_table) <= core.scheduler.block_manager.num_blocks_for(len(seq))
    for key in keys.values():
        if key is not None:
            registry.release(key)
    blocks = core.scheduler.block_manager
    assert not core.requests and blocks.num_free_blocks == blocks.num_blocks
    return {
        rid: (
            [t for o in outs for t in o.token_ids],
            "".join(o.text for o in outs),
            outs[-1].finish_reason,
            [(lp.token_id, round(lp.logprob, 4)) for o in outs for lp in o.logprobs or ()],
        )
        for rid, outs in outputs.items()
    }


JOBS = [
    ("base", LOOP, GREEDY, None),
    ("lora", LOOP[2:], GREEDY, "lora"),
    ("wide", LOOP[1:] + LOOP, GREEDY, "wide"),
    ("dora", LOOP[3:], GREEDY, "dora"),
    ("seeded", LOOP, SamplingParams(max_tokens=20, temperature=0.8, top_k=30, seed=7), "lora"),
    ("unseeded", LOOP[4:], SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9), "wide"),
    ("penalised", LOOP, PENALISED, "dora"),
    ("logprobs", LOOP[1:], SamplingParams(max_tokens=15, temperature=0.0, logprobs=2), None),
    ("short", LOOP, SamplingParams(max_tokens=3, temperature=0.0), "wide"),
    ("min-tokens", LOOP[2:], SamplingParams(max_tokens=10, min_tokens=6, temperature=0.0), None),
    ("regex", LOOP, SamplingParams(max_tokens=12, temperature=0.0, structured=REGEX), "lora"),
    ("opt-out", LOOP, SamplingParams(max_tokens=12, temperature=0.0, speculative=False), "lora"),
]


@pytest.mark.parametrize("merged", [[], ["wide"]])
def test_mixed_adapter_batches_give_the_tokens_of_plain_decoding(tiny_model_dir, store, merged) -> None:
    with_spec = _core(tiny_model_dir, store, NGRAM, merged=merged)
    core, registry = next(with_spec)
    plain = _core(tiny_model_dir, store, None, merged=merged)
    reference = _run(*next(plain), JOBS)
    assert _run(core, registry, JOBS) == reference
    spec = core.speculator
    assert spec is not None and sum(spec.proposed.values()) > 0 and sum(spec.accepted.values()) > 0
    assert {"lora", "dora", "wide"} <= {key.split("@")[0] for key in spec.proposed if key}
    for job in ("short", "min-tokens"):
        assert len(reference[job][0]) == {"short": 3, "min-tokens": 10}[job] or reference[job][2] is FinishReason.STOP
    for gen in (with_spec, plain):
        next(gen, None)


def test_stop_strings_end_a_speculating_row_where_plain_decoding_does(tiny_model_dir, store) -> None:
    probe = _core(tiny_model_dir, store, None)
    text = _run(*next(probe), [("probe", LOOP, GREEDY, None)])["probe"][1]
    next(probe, None)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    jobs = [("stopped", LOOP, SamplingParams(max_tokens=24, temperature=0.0, stop=(stop,)), None)]
    plain, spec = _core(tiny_model_dir, store, None), _core(tiny_model_dir, store, NGRAM)
    assert _run(*next(spec), jobs) == _run(*next(plain), jobs)
    for gen in (plain, spec):
        next(gen, None)


def test_greedy_speculation_matches_peft(tiny_model_dir, store) -> None:
    gen = _core(tiny_model_dir, store, NGRAM)
    core, registry = next(gen)
    got = _run(core, registry, [("a", LOOP, GREEDY, "dora"), ("b", LOOP[1:], GREEDY, "lora")])
    assert got["a"][0] == peft_greedy(tiny_model_dir, store / "dora", LOOP, 24)
    assert got["b"][0] == peft_greedy(tiny_model_dir, store / "lora", LOOP[1:], 24)
    next(gen, None)


def test_the_prefix_cache_never_holds_a_block_with_rejected_tokens(tiny_model_dir, store) -> None:
    gen = _core(tiny_model_dir, store, NGRAM)
    core, registry = next(gen)
    jobs = [("x", LOOP * 2, GREEDY, "lora"), ("y", LOOP, GREEDY, None)]
    got = _run(core, registry, jobs)
    blocks = core.scheduler.block_manager
    allowed = set()
    for rid, prompt, _, adapter in jobs:
        key = None if adapter is None else next(k for k in core.speculator.proposed if k and k.startswith(adapter))
        tokens, parent = prompt + got[rid][0], ROOT_HASH
        for start in range(0, len(tokens) - blocks.block_size + 1, blocks.block_size):
            parent = block_hash(parent, tokens[start : start + blocks.block_size], key)
            allowed.add(parent)
    assert blocks.num_cached_blocks > 0 and set(blocks._block_of) <= allowed
    assert sum(core.speculator.proposed.values()) > sum(core.speculator.accepted.values())  # some were rejected
    next(gen, None)


def test_a_request_opts_out_through_its_speculative_field() -> None:
    for value in (True, False):
        body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], speculative=value)
        params = sampling_request(body).params(0, 3, 100, GenerationDefaults())
        assert params.speculative is value
    with pytest.raises(ValueError):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], speculative="sometimes")


def test_the_policy_backs_off_where_speculating_costs_more_per_token_and_retries_now_and_then() -> None:
    policy = SpeculationPolicy()
    assert policy.speculate(32)  # unmeasured: try it
    policy.record(32, True, seconds=0.30, num_tokens=40)  # 7.5 ms per token with proposals
    assert not policy.speculate(32)  # the plain step is not measured yet
    policy.record(32, False, seconds=0.16, num_tokens=32)  # 5 ms per token without
    choices = [policy.speculate(32) for _ in range(EXPLORE_EVERY * 2)]
    assert 1 <= choices.count(True) <= 2  # it backs off, re-measuring once per EXPLORE_EVERY steps
    assert policy.speculate(1)  # another batch size is measured on its own
    policy.record(1, True, seconds=0.01, num_tokens=4)
    policy.record(1, False, seconds=0.01, num_tokens=1)
    assert sum(policy.speculate(1) for _ in range(EXPLORE_EVERY)) >= EXPLORE_EVERY - 1


def test_the_policy_tries_less_often_while_its_tries_confirm_the_choice_and_again_once_it_changes() -> None:
    policy = SpeculationPolicy()
    policy.speculate(32)
    policy.record(32, True, seconds=0.30, num_tokens=40)  # 7.5 ms per token with proposals
    policy.speculate(32)
    policy.record(32, False, seconds=0.16, num_tokens=32)  # 5 ms per token without
    tries = []
    for step in range(1, 2000):
        if policy.speculate(32):
            tries.append(step)
            policy.record(32, True, seconds=0.30, num_tokens=40)  # each try confirms: still dearer
    gaps = [later - earlier for earlier, later in zip([0, *tries], tries, strict=False)]
    assert gaps[:6] == [EXPLORE_EVERY * 2**i for i in range(4)] + [EXPLORE_MAX, EXPLORE_MAX]
    while not policy.speculate(32):
        pass
    for _ in range(30):  # this try finds speculation cheap now: 2 ms per token
        policy.record(32, True, seconds=0.08, num_tokens=40)
    choices = [policy.speculate(32) for _ in range(EXPLORE_EVERY)]
    assert choices == [True] * (EXPLORE_EVERY - 1) + [False]  # the choice changed, and the other is tried again soon


def test_the_policy_weighs_speculating_steps_by_the_tokens_they_keep() -> None:
    policy = SpeculationPolicy()
    policy.speculate(1)
    for _ in range(20):  # steps alternately keep 1 and 5 tokens at 12 ms: 4 ms per token over both
        policy.record(1, True, seconds=0.012, num_tokens=1)
        policy.record(1, True, seconds=0.012, num_tokens=5)
    policy.record(1, False, seconds=0.006, num_tokens=1)  # 6 ms without; the mean of 12 and 2.4 ms per step is 7.2
    assert policy.cost(1, True) == pytest.approx(0.004, rel=0.05)
    assert sum(policy.speculate(1) for _ in range(EXPLORE_EVERY)) == EXPLORE_EVERY - 1


class _Counting:
    """Proposes as many tokens as the row may: 100, 101, ..."""

    def propose(self, rows: list[tuple[Sequence, int]]) -> list[list[int]]:
        return [list(range(100, 100 + room)) for _, room in rows]

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Nothing kept per row."""


def test_a_row_proposes_as_many_tokens_as_its_recent_verifications_kept() -> None:
    spec = Speculator(SpeculativeConfig(6, 1, 3), 100, proposer=_Counting())
    seq = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=50, temperature=0.0))
    seq.num_computed_tokens = len(seq) - 1
    lengths = []
    for num_kept in (2, 1, 0, 0, 1, 2, 4, 5):  # proposals verification keeps, out of each step's
        spec.propose([seq], False, lambda _: True, lambda _: None, lambda _: None)
        proposed = list(seq.draft_token_ids)
        lengths.append(len(proposed))
        sampled = [*proposed[:num_kept], 7, *proposed[num_kept + 1 :], 8][: len(proposed) + 1]
        item = ScheduledSequence(seq, len(proposed) + 1, seq.num_computed_tokens, True, len(proposed))
        assert spec.verify(item, sampled, None) == [*proposed[:num_kept], sampled[num_kept]]
    # cut at i -> i + 1 next; a whole proposal kept -> twice as long, up to k = 6
    assert lengths == [6, 3, 2, 1, 1, 2, 4, 6]
    spec.finish(seq, FinishReason.STOP)
    spec.propose([seq], False, lambda _: True, lambda _: None, lambda _: None)
    assert len(seq.draft_token_ids) == 6  # a request that ended is forgotten


def test_no_row_proposes_in_a_step_that_computes_prompt_tokens() -> None:
    spec = Speculator(SpeculativeConfig(4, 1, 3), 100, proposer=_Counting())
    decoding = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=50, temperature=0.0))
    decoding.num_computed_tokens = len(decoding) - 1
    prompt = Sequence("b", [4, 5, 6, 7], SamplingParams(max_tokens=50, temperature=0.0))
    for running, waiting in (([decoding], True), ([decoding, prompt], False)):
        spec.propose(running, waiting, lambda _: True, lambda _: None, lambda _: None)
        assert decoding.draft_token_ids == []
    spec.propose([decoding], False, lambda _: True, lambda _: None, lambda _: None)
    assert len(decoding.draft_token_ids) == 4


def test_metrics_count_proposed_and_accepted_per_adapter_and_the_dashboard_divides_them() -> None:
    metrics = Metrics(2, 4)
    metrics.set_base_model("tiny")
    exposed = metrics.render().decode()
    assert 'loraplex_spec_decode_num_draft_tokens_total{adapter="tiny"} 0.0' in exposed
    metrics.record_speculation([("sql", 8, 5), (None, 4, 1), ("a", 1, 0), ("b", 2, 2), ("sql", 2, 2)])
    exposed = metrics.render().decode()
    assert 'loraplex_spec_decode_num_draft_tokens_total{adapter="sql"} 10.0' in exposed
    assert 'loraplex_spec_decode_num_accepted_tokens_total{adapter="sql"} 7.0' in exposed
    assert 'loraplex_spec_decode_num_accepted_tokens_total{adapter="tiny"} 1.0' in exposed
    assert 'loraplex_spec_decode_num_draft_tokens_total{adapter="other"} 2.0' in exposed  # past the label cap
    panels = json.loads(DASHBOARD.read_text())["panels"]
    (panel,) = [p for p in panels if "speculative" in p["title"].lower()]
    accepted, proposed = panel["targets"][0]["expr"].split(" / ")
    assert "loraplex_spec_decode_num_accepted_tokens_total" in accepted and "by (adapter)" in accepted
    assert "loraplex_spec_decode_num_draft_tokens_total" in proposed and "by (adapter)" in proposed


def test_take_counts_hands_out_what_was_gained_since_the_last_call() -> None:
    spec = Speculator(SpeculativeConfig(2, 1, 2), 100)
    spec.proposed.update({"sql@1": 4, None: 2})
    spec.accepted.update({"sql@1": 3})
    assert sorted(spec.take_counts(), key=str) == sorted([("sql", 4, 3), (None, 2, 0)], key=str)
    assert spec.take_counts() == []
    spec.proposed["sql@1"] += 2
    assert spec.take_counts() == [("sql", 2, 0)]


def test_a_bad_speculative_config_stops_serve_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    good = cli.settings_from_args(parser.parse_args(["serve", "--speculative-config", NGRAM]), parser)
    assert good.speculative_config == NGRAM
    args = parser.parse_args(["serve", "--speculative-config", '{"method": "draft_model"}'])
    with pytest.raises(SystemExit) as exit_info:
        cli.settings_from_args(args, parser)
    assert exit_info.value.code == 2
    assert "--speculative-config" in capsys.readouterr().err


def test_proposals_that_do_not_fit_are_dropped_rather_than_preempting_anyone() -> None:
    blocks = BlockManager(4, 4)
    scheduler = Scheduler(
        SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=16, max_loras=4), blocks
    )
    a, b = Sequence("a", [1, 2, 3, 4, 5, 6, 7], GREEDY), Sequence("b", [8, 9, 1, 2, 3, 4, 5], GREEDY)
    for seq in (a, b):
        scheduler.add(seq)
    scheduler.advance(scheduler.schedule())
    for seq in (a, b):
        seq.output_token_ids.append(6)
    a.draft_token_ids = [7, 8, 9]  # 11 tokens need a third block; none is free
    plan = scheduler.schedule()
    assert not plan.preempted and [item.num_draft for item in plan.scheduled] == [0, 0] and a.draft_token_ids == []
    scheduler.advance(plan)
    scheduler.finish(b, FinishReason.STOP)
    a.output_token_ids.append(7)
    a.draft_token_ids = [8, 9, 1]
    (item,) = scheduler.schedule().scheduled
    assert (item.num_draft, item.num_new_tokens, item.samples) == (3, 4, True)
    assert len(a.block_table) == 3


def test_sampled_rows_speculate_and_a_seeded_one_gets_the_tokens_of_plain_decoding(tiny_model_dir, store) -> None:
    low = SamplingParams(max_tokens=30, temperature=0.05, seed=5)  # peaked enough that proposals get accepted
    jobs = [
        ("low", LOOP, low, "lora"),
        ("high", LOOP[1:], SamplingParams(max_tokens=30, temperature=1.0, seed=9), None),
    ]
    plain, spec = _core(tiny_model_dir, store, None), _core(tiny_model_dir, store, NGRAM)
    core, registry = next(spec)
    assert _run(core, registry, jobs) == _run(*next(plain), jobs)
    assert sum(core.speculator.proposed.values()) > 0 and sum(core.speculator.accepted.values()) > 0
    for gen in (plain, spec):
        next(gen, None)


def test_sampling_with_proposals_keeps_the_target_distribution(tiny_model_dir, store, monkeypatch) -> None:
    """Two-sample test on the tiny model: the second token of unseeded requests, plain vs always proposing the plain
    engine's most frequent second token (so acceptance and rejection both happen), with different server seeds."""
    params = SamplingParams(max_tokens=3, temperature=1.0, ignore_eos=True)  # room for one proposal at token 2
    jobs = [(f"r{i}", LOOP, params, None) for i in range(400)]

    def second_tokens(speculative: str | None, seed: int) -> list[int]:
        gen = _core(tiny_model_dir, store, speculative, seed=seed, max_num_seqs=256)
        got = _run(*next(gen), jobs)
        next(gen, None)
        return [got[rid][0][1] for rid, *_ in jobs]

    plain = second_tokens(None, 1)
    top = [token for token, _ in Counter(plain).most_common(4)]
    monkeypatch.setattr(PromptLookup, "propose", lambda self, rows: [[top[0]] * min(room, 1) for _, room in rows])
    spec = second_tokens(NGRAM, 2)
    bins = [*top, -1]
    observed = torch.tensor([[sum(t == b for t in sample) if b >= 0 else sum(t not in top for t in sample)
                              for b in bins] for sample in (plain, spec)], dtype=torch.float64)  # fmt: skip
    expected = observed.sum(0, keepdim=True) * observed.sum(1, keepdim=True) / observed.sum()
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 18.5  # 4 degrees of freedom, p = 0.001
    assert observed[1, 0] > 0 and observed[1, 1:].sum() > 0  # the proposal was kept and refused


def _rounded(value):
    """`value` with every float rounded to 4 decimals: the verification chunk runs the prefill attention path."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


def _streamed_text(sse: str) -> str:
    chunks = [json.loads(line[6:]) for line in sse.splitlines() if line.startswith("data: {")]
    return "".join(choice["text"] for chunk in chunks for choice in chunk["choices"])


async def _serve(model_dir, store, speculative: str | None, bodies: list[dict]) -> tuple[list, str]:
    """What a server answers `bodies` (the text of a streamed reply), and its metrics afterwards."""
    settings = Settings(model=model_dir, adapters_store=store, served_model_name="tiny", kv_cache_bytes=2**20,
                        block_size=4, max_loras=3, speculative_config=speculative)  # fmt: skip
    app = create_app(settings, build_engine)
    transport = httpx.ASGITransport(app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for _ in range(600):
            if (await client.get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        replies = [await client.post("/v1/completions", json=body) for body in bodies]
        assert [reply.status_code for reply in replies] == [200] * len(bodies)
        answers = [
            _streamed_text(reply.text) if body.get("stream") else reply.json()["choices"]
            for reply, body in zip(replies, bodies, strict=True)
        ]
        return answers, (await client.get("/metrics")).text


async def test_the_served_api_speculates_counts_it_and_honours_the_opt_out(tiny_model_dir, store) -> None:
    body = {"prompt": LOOP, "max_tokens": 16, "ignore_eos": True, "temperature": 0}
    bodies = [{**body, "model": "lora", "logprobs": 2}, {**body, "model": "tiny", "stream": True},
              {**body, "model": "dora", "speculative": False}]  # fmt: skip
    plain, _ = await _serve(tiny_model_dir, store, None, bodies)
    spec, metrics = await _serve(tiny_model_dir, store, NGRAM, bodies)
    assert _rounded(spec) == _rounded(plain) and plain[1]  # logprobs agree within the fidelity tolerance
    assert 'loraplex_spec_decode_num_draft_tokens_total{adapter="lora"}' in metrics
    assert 'loraplex_spec_decode_num_draft_tokens_total{adapter="tiny"}' in metrics
    assert 'adapter="dora"' in metrics and 'loraplex_spec_decode_num_draft_tokens_total{adapter="dora"}' not in metrics


def test_a_grammar_row_speculates_only_what_its_grammar_accepts_and_matches_plain_decoding(tiny_model_dir, store):
    repeat = GrammarSpec("regex", "(abc){2,6}x", "structured_outputs.regex")
    jobs = [
        ("greedy", LOOP, SamplingParams(max_tokens=24, temperature=0.0, structured=repeat), "wide"),
        ("seeded", LOOP[1:], SamplingParams(max_tokens=24, temperature=0.7, seed=3, structured=repeat), None),
        ("json", LOOP, SamplingParams(max_tokens=24, temperature=0.0, structured=REGEX), "dora"),
    ]
    plain, spec = _core(tiny_model_dir, store, None), _core(tiny_model_dir, store, NGRAM)
    core, registry = next(spec)
    got = _run(core, registry, jobs)
    assert got == _run(*next(plain), jobs)
    assert got["greedy"][1].endswith("x") and got["greedy"][1].startswith("abcabc")
    assert sum(core.speculator.accepted.values()) > 0
    for gen in (plain, spec):
        next(gen, None)


def test_a_failed_verification_step_leaves_nothing_behind(tiny_model_dir, store, monkeypatch) -> None:
    gen = _core(tiny_model_dir, store, NGRAM)
    core, registry = next(gen)
    jobs = [("a", LOOP, GREEDY, "lora"), ("b", LOOP[1:], SamplingParams(max_tokens=24, temperature=0.5, seed=1), None)]
    clean = _run(core, registry, jobs)
    execute, calls = core.runner.execute, []

    def fail_on_proposals(scheduled, *args, **kwargs):
        if any(item.num_draft for item in scheduled) and not calls:
            calls.append(1)
            raise RuntimeError("device fell over")
        return execute(scheduled, *args, **kwargs)

    monkeypatch.setattr(core.runner, "execute", fail_on_proposals)
    failed = _run(core, registry, jobs)  # checks every block is free again
    assert calls and {reason for _, _, reason, _ in failed.values()} == {FinishReason.ERROR}
    assert _run(core, registry, jobs) == clean
    next(gen, None)
