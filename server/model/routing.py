"""Adapter routing of one step: which adapter slot each token uses, and how the slot layers serve each run.

A token's adapter slot is a device slot `0 .. max_loras - 1`, or one of two markers: `BASE_SLOT` (the base model, no
delta) and `MERGED_SLOT` (the adapter merged into the base weights, `server.model.merge`: no delta, no correction).
The slot buffers of `server.model.lora` keep row `BASE_ROW` all zeros for the base model; `buffer_row` is where a
slot lives in them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from server.model.gather_plan import GatherPlan, RunsPlan, build_gather_plan, build_runs_plan

MIN_GEMM_RUN = 16  # shortest run served by its own GEMM pair; below it, per-token gathering is cheaper (measured)
BASE_SLOT = -1  # adapter slot of a base-model token: no delta
MERGED_SLOT = -2  # adapter slot of the tokens of the adapter merged into the base weights: no delta, no correction
BASE_ROW = 0  # slot-buffer row of the base model, all zeros

SlotIndex = TypeVar("SlotIndex", int, torch.Tensor)


def buffer_row(slot: SlotIndex) -> SlotIndex:
    """Row of the slot buffers holding adapter `slot` (an int, or a tensor of slots): row 0 is the base model's."""
    return slot + 1


def buffer_rows(max_loras: int) -> int:
    """Rows of slot buffers for `max_loras` slots: the base row and one per slot."""
    return buffer_row(max_loras - 1) + 1


@dataclass(eq=False)
class LoraBatch:
    """Adapter routing of one step, shared by every adapter-aware layer; build it with `make_lora_batch`."""

    token_slots: torch.Tensor  # [T] int64, adapter slot of each token, or BASE_SLOT / MERGED_SLOT
    seg_starts: torch.Tensor  # [S + 1] int64 (CPU), first token of each maximal run of equal slots, then T
    seg_slots: torch.Tensor  # [S] int64 (CPU), slot of each run
    active_slots: frozenset[int]  # every adapter slot with tokens in this step
    gemm_runs: tuple[tuple[int, int, int], ...]  # (start, end, slot) of runs served by one GEMM pair each
    gather_slots: frozenset[int]  # slots of the tokens served per token
    gather_rows: torch.Tensor | None  # [T] int64, buffer row per token: buffer_row(slot) if gathered, else BASE_ROW
    gather_rows_cpu: torch.Tensor | None  # [T] int64 (CPU), the same, for building plans without a device sync
    unmerged_runs: tuple[tuple[int, int], ...]  # (start, end) of maximal runs of tokens not in MERGED_SLOT
    _plans: dict[tuple, GatherPlan | RunsPlan] = field(default_factory=dict, init=False, repr=False)

    def gather_plan(self, ranks: Mapping[int, int], in_features: int, granules: int, width: int) -> GatherPlan:
        """The plan for buffers of `granules` granules of `width` ranks, given each gathered slot's rank there.

        Built once per step for each distinct layout, usually shared by every layer.
        """
        key = (in_features, granules, width, tuple(sorted(ranks.items())))
        if key not in self._plans:
            rows, device = self.gather_rows_cpu, self.token_slots.device
            row_ranks = {buffer_row(slot): rank for slot, rank in ranks.items()}
            self._plans[key] = build_gather_plan(rows, row_ranks, in_features, granules, width, device)
        return self._plans[key]

    def runs_plan(self, runs: tuple[tuple[int, int], ...], padded: bool = False) -> RunsPlan:
        """The plan batching GEMM runs `[start, end)` into one GEMM pair; built once per step, shared by layers.
        `padded`: the runs are padded to `padded_rows` of the longest, not to the longest itself.
        """
        key = ("runs", runs, padded)
        if key not in self._plans:
            self._plans[key] = build_runs_plan(runs, self.token_slots.device, padded)
        return self._plans[key]


def find_segments(token_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split per-token slots into maximal runs of equal slot: `seg_starts [S + 1]`, `seg_slots [S]`."""
    bounds, seg_slots = _runs(token_slots.tolist())
    return torch.tensor(bounds, dtype=torch.int64), torch.tensor(seg_slots, dtype=torch.int64)


def _runs(slots: list[int]) -> tuple[list[int], list[int]]:
    """First token of each maximal run of equal slot, then the token count; and each run's slot."""
    bounds, seg_slots = [], []
    for t, slot in enumerate(slots):
        if not seg_slots or slot != seg_slots[-1]:
            bounds.append(t)
            seg_slots.append(slot)
    bounds.append(len(slots))
    return bounds, seg_slots


def make_lora_batch(token_slots: torch.Tensor, min_gemm_run: int = MIN_GEMM_RUN) -> LoraBatch:
    """Route one step: adapter runs of `min_gemm_run` tokens or more get GEMMs, the other adapter tokens are gathered.

    `token_slots` [T] may live on the model's device (one host copy is made); slots must be < the layers' `max_loras`.
    Adapter slots are the non-negative ones: both markers are negative. Routing is plain Python over the runs: a
    handful of small torch ops cost more per step than the whole loop (~150 µs against tens).
    """
    slots = token_slots.tolist()
    bounds, seg_slots = _runs(slots)
    runs = [(bounds[i], bounds[i + 1], slot) for i, slot in enumerate(seg_slots) if slot >= 0]
    gathered = [run for run in runs if run[1] - run[0] < min_gemm_run]
    rows = None
    if gathered:
        per_token = [BASE_ROW] * len(slots)
        for start, end, slot in gathered:
            per_token[start:end] = [buffer_row(slot)] * (end - start)
        rows = torch.tensor(per_token, dtype=torch.int64)
    return LoraBatch(
        token_slots=token_slots,
        seg_starts=torch.tensor(bounds, dtype=torch.int64),
        seg_slots=torch.tensor(seg_slots, dtype=torch.int64),
        active_slots=frozenset(slot for _, _, slot in runs),
        gemm_runs=tuple(run for run in runs if run[1] - run[0] >= min_gemm_run),
        gather_slots=frozenset(slot for _, _, slot in gathered),
        gather_rows=None if rows is None else rows.to(token_slots.device),
        gather_rows_cpu=rows,
        unmerged_runs=_unmerged_runs(bounds, seg_slots),
    )


def _unmerged_runs(bounds: list[int], seg_slots: list[int]) -> tuple[tuple[int, int], ...]:
    """Maximal runs of tokens that do not belong to the merged adapter: they get its correction."""
    runs: list[tuple[int, int]] = []
    for start, end, slot in zip(bounds[:-1], bounds[1:], seg_slots, strict=True):
        if slot == MERGED_SLOT:
            continue
        if runs and runs[-1][1] == start:
            start = runs.pop()[0]
        runs.append((start, end))
    return tuple(runs)
