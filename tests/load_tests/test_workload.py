"""The load plan: reproducible, arrival rates and popularity laws as specified, lengths in range."""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter

import pytest

from load_tests.workload import LengthRange, Workload, arrival_times, pick_models, plan

MODELS = ["base", "a", "b", "c"]


def test_plan_is_reproducible_and_within_ranges():
    workload = Workload(num_requests=50, rate=10.0, prompt_len=LengthRange(3, 9), output_len=LengthRange(4, 4),
                        token_ids=LengthRange(100, 120), seed=7)  # fmt: skip
    first, second = plan(workload, MODELS), plan(workload, MODELS)
    assert first == second
    assert [r.index for r in first] == list(range(50))
    assert all(3 <= len(r.prompt) <= 9 and r.max_tokens == 4 for r in first)
    assert all(100 <= t <= 120 for r in first for t in r.prompt)
    assert [r.send_at for r in first] == sorted(r.send_at for r in first)
    assert plan(Workload(num_requests=50, rate=10.0, seed=8), MODELS) != first


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_arrivals_have_the_asked_rate_and_burstiness(burstiness):
    times = arrival_times(random.Random(0), 20000, rate=50.0, burstiness=burstiness)
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 50, rel=0.05)
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)  # gamma: cv = 1/sqrt(shape)


def test_infinite_rate_sends_everything_at_once():
    assert arrival_times(random.Random(0), 5, math.inf, 1.0) == [0.0] * 5


def test_uniform_popularity_spreads_evenly():
    counts = Counter(pick_models(random.Random(0), MODELS, 8000, "uniform", 1.0))
    assert all(c == pytest.approx(2000, rel=0.1) for c in counts.values())


def test_zipf_popularity_follows_rank():
    counts = Counter(pick_models(random.Random(0), MODELS, 20000, "zipf", 1.0))
    harmonic = sum(1 / k for k in range(1, 5))
    for rank, model in enumerate(MODELS, start=1):
        assert counts[model] / 20000 == pytest.approx(1 / rank / harmonic, rel=0.08)


def test_power_popularity_is_s_lora_s():
    # index = floor(n * U^(1/alpha)): P(index < k) = (k/n)^alpha
    counts = Counter(pick_models(random.Random(0), MODELS, 20000, "power", 0.5))
    assert counts["base"] / 20000 == pytest.approx((1 / 4) ** 0.5, rel=0.05)
    assert (counts["base"] + counts["a"]) / 20000 == pytest.approx((2 / 4) ** 0.5, rel=0.05)
    flat = Counter(pick_models(random.Random(0), MODELS, 8000, "power", 1.0))
    assert all(c == pytest.approx(2000, rel=0.1) for c in flat.values())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        LengthRange.parse("9:3")
    with pytest.raises(ValueError):
        Workload(rate=0)
    with pytest.raises(ValueError):
        pick_models(random.Random(0), [], 1, "uniform", 1.0)
    assert LengthRange.parse("12") == LengthRange(12, 12)
