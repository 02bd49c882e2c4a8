"""The shipped adapters served in bf16 agree with PEFT in bf16 except at near-ties (training/bf16_fidelity.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.bf16_fidelity import PeftRun, agreement, bf16_ulp, check, near_tie_bound
from training.tasks import TASKS

STORE = Path(__file__).resolve().parents[2] / "adapters_store"


@pytest.mark.parametrize("value", [0.3, 1.0, 1.5, 17.0, -25.0, 100.0])
def test_bf16_ulp_is_the_spacing_of_bf16_numbers(value):
    x = torch.tensor(abs(value), dtype=torch.bfloat16)
    above = torch.nextafter(x, torch.tensor(float("inf"), dtype=torch.bfloat16))  # the next bf16 number
    assert bf16_ulp(value) == float(above - x)


def test_near_tie_bound_is_four_ulps():
    assert near_tie_bound(20.0) == 0.5  # 20 lies in [16, 32), where bf16 steps by 0.125


def test_agreement_finds_the_first_differing_step_and_peft_gap_there():
    peft = PeftRun(tokens=[5, 6, 7, 2], tops=[20.0, 20.0, 20.0, 20.0], gaps=[3.0, 0.2, 1.0, 4.0])
    assert agreement([5, 6, 7, 2], peft).step is None
    tie = agreement([5, 9, 1], peft)
    assert (tie.step, tie.gap, tie.near_tie) == (1, 0.2, True)
    real = agreement([5, 6, 8], peft)
    assert (real.step, real.near_tie) == (2, False)
    early_eos = agreement([5, 6], peft)  # we stopped where PEFT went on
    assert early_eos.step == 2


@pytest.mark.slow
def test_shipped_adapters_in_bf16_match_peft_except_near_ties(default_model_dir):
    """Two held-out prompts per task, 12 tokens each (about a minute on 2 cores)."""
    results = check(list(TASKS.values()), STORE, per_task=2, max_new_tokens=12)
    for name, r in results.items():
        assert r["diverged"] == [], name
        assert r["identical"] + r["near_ties"] == r["total"], name
    sentiment = results["sentiment-label"]  # its answers are complete within 12 tokens
    assert sentiment["score"] == sentiment["total"]
