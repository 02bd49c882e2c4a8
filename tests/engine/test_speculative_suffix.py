"""Suffix speculation: proposals from each adapter's earlier outputs, exact against plain decoding."""

from __future__ import annotations

import pytest

from server.engine.sequence import FinishReason, SamplingParams, Sequence
from server.engine.speculative.config import SpeculativeConfig, parse_speculative_config
from server.engine.speculative.suffix import SuffixProposer
from server.errors import ConfigurationError
from tests.engine.test_speculative import ADAPTERS, JOBS, _core, _run
from tests.helpers import make_adapter_store

SUFFIX = '{"method": "suffix", "num_speculative_tokens": 4}'
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory):
    return make_adapter_store(tiny_model_dir, tmp_path_factory.mktemp("suffix-store"), ADAPTERS)


def _ended(proposer: SuffixProposer, prompt: list[int], output: list[int], adapter: str | None = "a@1") -> None:
    seq = Sequence(f"r{proposer.num_cached()}", prompt, GREEDY, adapter=adapter)
    seq.output_token_ids.extend(output)
    proposer.finish(seq, FinishReason.STOP)


def _proposal(proposer: SuffixProposer, tokens: list[int], room: int = 4, adapter: str | None = "a@1") -> list[int]:
    (proposal,) = proposer.propose([(Sequence("now", tokens, GREEDY, adapter=adapter), room)])
    return proposal


def test_config_takes_vllm_suffix_keys_with_its_defaults_and_refuses_bad_ones() -> None:
    assert parse_speculative_config('{"method": "suffix"}') == SpeculativeConfig(
        24, 1, 24, "suffix", max_tree_depth=24, max_cached_requests=10_000, max_spec_factor=1.0, min_token_prob=0.1
    )
    custom = parse_speculative_config(
        '{"method": "suffix", "num_speculative_tokens": 5, "suffix_decoding_max_tree_depth": 8, '
        '"suffix_decoding_max_cached_requests": 0, "suffix_decoding_max_spec_factor": 2.5, '
        '"suffix_decoding_min_token_prob": 0.5}'
    )
    assert (custom.num_speculative_tokens, custom.max_tree_depth, custom.max_cached_requests) == (5, 8, 0)
    assert (custom.max_spec_factor, custom.min_token_prob) == (2.5, 0.5)
    for bad, words in [
        ('{"method": "suffix", "prompt_lookup_max": 2}', "unknown keys"),
        ('{"method": "suffix", "suffix_decoding_min_token_prob": 1.5}', "between 0 and 1"),
        ('{"method": "suffix", "suffix_decoding_max_spec_factor": -1}', "at least 0"),
        ('{"method": "suffix", "suffix_decoding_max_tree_depth": 0}', "positive integer"),
        ('{"method": "suffix", "suffix_decoding_max_cached_requests": -1}', "non-negative"),
        ('{"method": "suffix", "num_speculative_tokens": 64}', "at most 32"),
        ('{"method": "draft_model", "num_speculative_tokens": 3}', "needs model"),
        ('{"method": "ngram", "num_speculative_tokens": 3, "model": "x"}', "unknown keys"),
    ]:
        with pytest.raises(ConfigurationError, match=words):
            parse_speculative_config(bad)


def test_the_adapter_s_earlier_outputs_propose_what_most_of_them_continue_with() -> None:
    proposer = SuffixProposer(SpeculativeConfig(4, method="suffix", max_spec_factor=4.0, min_token_prob=0.5))
    header = [90, 91]  # the prompt's last tokens (a chat template's assistant header)
    for name in ([40], [41], [42]):
        _ended(proposer, [1, 2, *header], [7, 8, *name, 9, 10, 11, 12])
    _ended(proposer, [3, *header], [7, 8, 43, 9, 10, 5])
    assert _proposal(proposer, [5, 6, *header]) == [7, 8]  # all four agree on 7 8, then on no name
    assert _proposal(proposer, [5, 6, *header, 7, 8, 44, 9]) == [10, 11, 12]  # 11 wins 3 of 4, 12 all of those 3
    assert _proposal(proposer, [5, 6, 9], room=1) == [10]
    assert _proposal(proposer, [5, 6, 9], adapter="b@1") == []  # another adapter's outputs never steer it
    assert _proposal(proposer, [5, 6, 9], adapter="a@2") == []  # nor an older version's


def test_agreement_under_min_token_prob_and_the_spec_factor_end_a_proposal() -> None:
    strict = SuffixProposer(SpeculativeConfig(4, method="suffix", max_spec_factor=4.0, min_token_prob=0.8))
    short = SuffixProposer(SpeculativeConfig(4, method="suffix", max_spec_factor=1.0, min_token_prob=0.1))
    for proposer in (strict, short):
        for tail in ([1, 2, 3], [1, 2, 3], [1, 2, 4], [1, 5, 6]):
            _ended(proposer, [0], [8, *tail])
    assert _proposal(strict, [9, 8]) == [1]  # then 2 has 3 of 4: 0.75 < 0.8
    assert _proposal(short, [9, 8]) == [1]  # one matched token: one proposed
    assert _proposal(short, [0, 8]) == [1, 2]  # "0 8" matched: two


def test_a_longer_match_in_the_row_itself_wins_over_the_history() -> None:
    proposer = SuffixProposer(SpeculativeConfig(4, method="suffix", max_spec_factor=4.0))
    _ended(proposer, [0], [6, 7, 1, 1, 1])
    assert _proposal(proposer, [5, 6, 7, 2, 2, 6, 7]) == [2, 2, 6, 7]  # "6 7" in the row and in the history: the row
    assert _proposal(proposer, [3, 4, 6, 7]) == [1, 1, 1]  # the row has no earlier "7"


def test_only_normally_ended_outputs_are_cached_and_the_budget_evicts_the_oldest() -> None:
    proposer = SuffixProposer(SpeculativeConfig(4, method="suffix", max_cached_requests=3))
    for reason in (FinishReason.CANCELLED, FinishReason.ERROR):
        seq = Sequence("x", [1], GREEDY, adapter="a@1")
        seq.output_token_ids.extend([2, 3, 4])
        proposer.finish(seq, reason)
    assert proposer.num_cached() == 0
    for adapter in ("a@1", "b@1", "c@1", "d@1", "b@1"):
        _ended(proposer, [1], [2, 3], adapter=adapter)
    assert proposer.num_cached() == 3
    assert _proposal(proposer, [9, 2], adapter="a@1") == []  # the oldest went first
    assert _proposal(proposer, [9, 2], adapter="b@1") == [3]
    off = SuffixProposer(SpeculativeConfig(4, method="suffix", max_cached_requests=0))
    _ended(off, [1], [2, 3])
    assert off.num_cached() == 0


def test_suffix_speculation_gives_the_tokens_of_plain_decoding_once_histories_fill(tiny_model_dir, store) -> None:
    with_spec = _core(tiny_model_dir, store, SUFFIX)
    core, registry = next(with_spec)
    plain = _core(tiny_model_dir, store, None)
    reference = next(plain)
    assert _run(core, registry, JOBS) == _run(*reference, JOBS)
    assert core.speculator.proposer.num_cached() > 0
    first = sum(core.speculator.accepted.values())
    assert _run(core, registry, JOBS) == _run(*reference, JOBS)  # now every adapter's earlier answers propose
    assert sum(core.speculator.accepted.values()) - first > first  # greedy rows repeat their first answers
    for gen in (with_spec, plain):
        next(gen, None)
