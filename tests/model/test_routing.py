"""Routing one step's tokens to adapter slots: segments, GEMM runs, gathered rows, plans, merged-adapter runs."""

from __future__ import annotations

import pytest
import torch

from server.model.routing import (
    BASE_ROW,
    BASE_SLOT,
    MERGED_SLOT,
    buffer_row,
    buffer_rows,
    find_segments,
    make_lora_batch,
)

IN = 32


@pytest.mark.parametrize(
    ("slots", "starts", "seg_slots"),
    [
        ([], [0], []),
        ([3], [0, 1], [3]),
        ([-1, -1], [0, 2], [-1]),
        ([0, 0, 1, 1, 1, -1, 2], [0, 2, 5, 6, 7], [0, 1, -1, 2]),
        ([1, 1, 0, 1], [0, 2, 3, 4], [1, 0, 1]),
        ([-1, 4, -1], [0, 1, 2, 3], [-1, 4, -1]),
    ],
)
def test_find_segments(slots, starts, seg_slots):
    seg_starts, found = find_segments(torch.tensor(slots, dtype=torch.int64))
    assert seg_starts.tolist() == starts
    assert found.tolist() == seg_slots


@pytest.mark.parametrize(
    ("slots", "gemm_runs", "gather_slots", "gather_rows"),
    [
        ([-1, -1], (), set(), None),
        ([0, 1, 2], (), {0, 1, 2}, [1, 2, 3]),
        ([0, -1, 2], (), {0, 2}, [1, 0, 3]),
        ([0, 0, 0, 1, -1], ((0, 3, 0),), {1}, [0, 0, 0, 2, 0]),
        ([5, 5, 5, 5], ((0, 4, 5),), set(), None),
        ([1, 2, 2, 2, 2, 1], ((1, 5, 2),), {1}, [2, 0, 0, 0, 0, 2]),
    ],
)
def test_make_lora_batch_routes_runs(slots, gemm_runs, gather_slots, gather_rows):
    batch = make_lora_batch(torch.tensor(slots, dtype=torch.int64), min_gemm_run=3)
    assert batch.gemm_runs == gemm_runs
    assert batch.gather_slots == gather_slots
    assert batch.active_slots == {s for s in slots if s >= 0}
    assert (batch.gather_rows.tolist() if batch.gather_rows is not None else None) == gather_rows


def test_gather_plan_reads_each_token_at_its_own_rank():
    batch = make_lora_batch(torch.tensor([0, -1, 1, 1]), min_gemm_run=10**9)
    plan = batch.gather_plan({0: 20, 1: 3}, in_features=IN, granules=2, width=16)  # slot 0: 2 granules, slot 1: 1
    assert batch.gather_plan({1: 3, 0: 20}, IN, 2, 16) is plan  # built once per step, shared by every layer
    assert plan.bag_tokens.tolist() == [0, 0, 2, 3]
    # slot s lives in buffer row s + 1, whose granules are a_t rows (s + 1) * 2 + j, each a block of IN rows
    assert plan.shrink_index[:, 0].tolist() == [2 * IN, 3 * IN, 4 * IN, 4 * IN]
    assert plan.expand_offsets.tolist() == [0, 20, 20, 23]
    assert plan.expand_index.tolist() == [*range(32, 52), 64, 65, 66, 64, 65, 66]
    assert plan.expand_inputs.tolist() == [*range(20), 32, 33, 34, 48, 49, 50]


@pytest.mark.parametrize(
    ("slots", "unmerged_runs", "gather_rows"),
    [
        ([-2, -2], (), None),
        ([-2, -1, -1], ((1, 3),), None),
        ([-2, -2, -1, 0, 0, -2, 1], ((2, 5), (6, 7)), [0, 0, 0, 1, 1, 0, 2]),
        ([0, 1, -1], ((0, 3),), [1, 2, 0]),
    ],
)
def test_merged_tokens_get_no_delta_and_the_others_the_correction(slots, unmerged_runs, gather_rows):
    batch = make_lora_batch(torch.tensor(slots), min_gemm_run=10**9)
    assert batch.unmerged_runs == unmerged_runs
    assert batch.active_slots == {s for s in slots if s >= 0} and not batch.gemm_runs
    assert (None if batch.gather_rows is None else batch.gather_rows.tolist()) == gather_rows


def test_slot_to_buffer_row_rule():
    assert buffer_row(BASE_SLOT) == BASE_ROW == 0 and buffer_row(0) == 1 and buffer_rows(max_loras=4) == 5
    assert buffer_row(torch.tensor([0, 3])).tolist() == [1, 4]
    assert MERGED_SLOT < 0 and BASE_SLOT < 0 and MERGED_SLOT != BASE_SLOT  # both markers are no adapter slot
