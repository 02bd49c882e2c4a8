"""The merge policy as a pure function of demand, modes and time: windows, hysteresis, competing adapters."""

from __future__ import annotations

import pytest

from server.engine.merge_policy import Demand, MergePolicy, MergePolicyConfig, start_modes
from server.settings import Settings

MODES = {"p": "merged", "q": "merged", "a": "auto", "b": "auto", "u": "unmerged"}
CONFIG = MergePolicyConfig(merge_share=0.6, unmerge_share=0.4, window_s=1.0)


def _run(timeline, merged=None, modes=MODES, config=CONFIG) -> list[str | None]:
    """Decide at each (time, {adapter: requests}, base requests) and apply the decision; the merged one after each."""
    policy = MergePolicy(config, lambda name: modes[name])
    seen = []
    for now, counts, base in timeline:
        merged = policy.decide(Demand(counts, sum(counts.values()) + base), merged, now)
        seen.append(merged)
    return seen


@pytest.mark.parametrize(
    ("timeline", "want"),
    [
        # an auto adapter is merged once its share has stayed at 0.6 or more for the window
        ([(0, {"a": 7}, 3), (0.5, {"a": 7}, 3), (1.0, {"a": 6}, 4)], [None, None, "a"]),
        # a dip below the merge share restarts the window
        ([(0, {"a": 7}, 3), (0.5, {"a": 5}, 5), (1.0, {"a": 7}, 3), (1.9, {"a": 7}, 3), (2.0, {"a": 7}, 3)],
         [None, None, None, None, "a"]),
        # a share that never reaches the merge share merges nothing, however long it lasts
        ([(t, {"a": 5, "b": 3}, 2) for t in range(5)], [None] * 5),
        # unmerged adapters are never merged, whatever their share
        ([(t, {"u": 10}, 0) for t in range(3)], [None] * 3),
        # with no traffic, time does not unmerge a merged-mode adapter
        ([(0, {"p": 1}, 5), (10, {}, 0), (20, {}, 3)], ["p", "p", "p"]),
    ],
)  # fmt: skip
def test_auto_window(timeline, want):
    assert _run(timeline) == want


@pytest.mark.parametrize(
    ("shares", "want"),
    [
        ([5, 5, 5], ["a", "a", "a"]),  # between the thresholds: stays merged (hysteresis)
        ([3, 3, 3], ["a", "a", None]),  # below the unmerge share for the window: unmerged
        ([3, 5, 3, 3, 3], ["a", "a", "a", "a", None]),  # a recovery restarts the window
        ([4, 4, 4], ["a", "a", "a"]),  # exactly at the unmerge share: still merged
    ],
)
def test_auto_hysteresis_unmerges_below_the_lower_threshold(shares, want):
    timeline = [(0.5 * t, {"a": n}, 10 - n) for t, n in enumerate(shares)]
    assert _run(timeline, merged="a") == want


@pytest.mark.parametrize(
    ("timeline", "want"),
    [
        # the first merged-mode adapter with traffic is merged at once, and stays through a brief rival lead
        ([(0, {"p": 1}, 0), (0.5, {"p": 1, "q": 4}, 0), (1.0, {"p": 4, "q": 1}, 0), (2.0, {"p": 4, "q": 1}, 0)],
         ["p", "p", "p", "p"]),
        # a rival that leads by the band (0.2 of all requests) for the window takes over
        ([(0, {"p": 2}, 0), (0.1, {"p": 2, "q": 6}, 2), (0.6, {"p": 2, "q": 6}, 2), (1.1, {"p": 2, "q": 6}, 2)],
         ["p", "p", "p", "q"]),
        # a lead smaller than the band never switches
        ([(t, {"p": 4, "q": 5}, 1) for t in range(4)], ["q", "q", "q", "q"]),
        ([(0, {"p": 4}, 0), *((t, {"p": 4, "q": 5}, 1) for t in range(1, 4))], ["p", "p", "p", "p"]),
        # ties go to the merged one, and first by name when nothing is merged
        ([(0, {"q": 3, "p": 3}, 0), (5, {"q": 3, "p": 3}, 0)], ["p", "p"]),
        # the switch back needs its own window and lead
        ([(0, {"p": 1}, 0), (1, {"q": 8, "p": 1}, 1), (2, {"q": 8, "p": 1}, 1), (3, {"p": 8, "q": 2}, 0),
          (3.5, {"p": 8, "q": 2}, 0), (4, {"p": 8, "q": 2}, 0)], ["p", "p", "q", "q", "q", "p"]),
    ],
)  # fmt: skip
def test_two_merged_mode_adapters_compete_with_hysteresis(timeline, want):
    assert _run(timeline) == want


@pytest.mark.parametrize(
    ("merged", "timeline", "want"),
    [
        # a merged-mode adapter with traffic outranks a dominant auto adapter, after the window
        ("a", [(0, {"a": 8, "p": 1}, 1), (1, {"a": 8, "p": 1}, 1)], ["a", "p"]),
        # an idle merged-mode adapter yields to an auto adapter that dominates for the window
        ("p", [(0, {"a": 8}, 2), (0.5, {"a": 8}, 2), (1, {"a": 8}, 2)], ["p", "p", "a"]),
        # a merged adapter whose mode became unmerged is unmerged at once
        ("u", [(0, {"u": 9}, 1)], [None]),
    ],
)
def test_modes_rank_merged_over_auto(merged, timeline, want):
    assert _run(timeline, merged=merged) == want


def test_zero_window_swaps_on_the_first_step():
    config = MergePolicyConfig(window_s=0.0)
    assert _run([(0, {"a": 7}, 3), (0, {"a": 1}, 9)], config=config) == ["a", None]


def test_refused_adapters_are_never_proposed_again():
    policy = MergePolicy(CONFIG, lambda name: MODES[name])
    policy.refuse("p")
    assert policy.decide(Demand({"p": 5, "a": 1}, 6), None, 0.0) is None
    assert policy.decide(Demand({"p": 5, "a": 1}, 6), "p", 0.0) is None  # a merged one is let go at once


@pytest.mark.parametrize(("merge", "unmerge", "window"), [(0.4, 0.6, 1.0), (1.2, 0.4, 1.0), (0.6, 0.4, -1.0)])
def test_config_refuses_inconsistent_thresholds(merge, unmerge, window):
    with pytest.raises(ValueError):
        MergePolicyConfig(merge_share=merge, unmerge_share=unmerge, window_s=window)


def test_start_flags_override_stored_modes_by_name():
    settings = Settings(merged=["p", "both"], auto_merge=["a", "both"])
    mode_of = start_modes(settings, lambda adapter: "unmerged")
    assert [mode_of(n) for n in ("p", "p@3", "a", "a@1", "both", "other@2")] == [
        "merged", "merged", "auto", "auto", "merged", "unmerged"
    ]  # fmt: skip
    assert MergePolicyConfig.from_settings(Settings(merge_share=0.7, merge_window_s=0)).window_s == 0
