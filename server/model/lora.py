"""Per-token LoRA/DoRA deltas for a packed batch that mixes many adapters.

Every `TargetLinear` gets a `LoraSlots`: for each fused projection, Aᵀ and (s·B)ᵀ of `max_loras` device slots,
zero-padded to a shared rank capacity, and DoRA's factor `g` per slot (1 for LoRA). Buffer row 0 is all zeros and
stands for the base model, so slot `s` lives in row `s + 1`.

A step's tokens come in runs of equal slot. Runs of `MIN_GEMM_RUN` tokens or more (prefill) get one GEMM pair each
(Punica's SGMV). All other adapter tokens (decode) are served together by two `embedding_bag` calls that read each
token's rows of A and B straight out of the slot buffers, each token at its own rank (Punica's BGMV with the gather
fused into the reduction: no copy of per-token weights, no loop over adapters).

Measured on this CPU (1 thread; 2 threads on a quiet machine in brackets), one decode step of 32 tokens on 32
distinct r=8 adapters on q_proj and v_proj of SmolLM2-135M, per layer: qkv base GEMM 350 µs [186]; gathered
`torch.bmm` 420 µs [280]; a GEMM pair per run 980 µs [1170]; this path 195 µs [145], about the cost of reading those
adapters' 2.0 MB of A and B once (the qkv weight is 2.2 MB). A is stored in granules of `GRANULE` ranks, so a resident
r=64 slot costs r=8 tokens little (267 µs; padding them to 64 cost 3-4x). One run is cheaper as a GEMM pair than
gathered from about 12-16 tokens up.

While an adapter is merged into the base weights (`server.model.merge`), its tokens carry `MERGED_SLOT`: nothing is
added to them, and every other token first gets the merged adapter's `Correction`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from server.model.gather_plan import GatherPlan, build_gather_plan
from server.model.linear import TargetLinear

if TYPE_CHECKING:
    from server.model.merge import Correction

MIN_GEMM_RUN = 16  # shortest run served by its own GEMM pair; below it, per-token gathering is cheaper (measured)
RANK_ALIGN = 8  # slot buffers grow in steps of this many ranks up to one granule
GRANULE = 16  # the shrink gathers A in rows of at most this many ranks, so one wide slot slows the rest little
MERGED_SLOT = -2  # slot of the tokens of the adapter merged into the base weights: no delta, no correction


@dataclass(frozen=True)
class LoraWeights:
    """One adapter's update of one projection, ready to serve: `delta = (x·aᵀ)·bᵀ`, the scale already in `b`."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r], multiplied by the scale s
    g: torch.Tensor | None = None  # [out], DoRA factor m / ‖W + s·B·A‖_row; None for plain LoRA

    @cached_property
    def max_abs(self) -> tuple[float, float]:
        """(r · max|b| · max|a|, max|g|): bounds on |(b·a)[i, j]| and on the DoRA factor (1 for LoRA)."""
        update = self.a.shape[0] * float(self.b.abs().max()) * float(self.a.abs().max())
        return update, 1.0 if self.g is None else float(self.g.abs().max())


@dataclass(eq=False)
class LoraBatch:
    """Adapter routing of one step, shared by every adapter-aware layer; build it with `make_lora_batch`."""

    token_slots: torch.Tensor  # [T] int64, adapter slot of each token, -1 = base, MERGED_SLOT = the merged adapter
    seg_starts: torch.Tensor  # [S + 1] int64 (CPU), first token of each maximal run of equal slots, then T
    seg_slots: torch.Tensor  # [S] int64 (CPU), slot of each run, -1 = base
    active_slots: frozenset[int]  # every adapter slot with tokens in this step
    gemm_runs: tuple[tuple[int, int, int], ...]  # (start, end, slot) of runs served by one GEMM pair each
    gather_slots: frozenset[int]  # slots of the tokens served per token
    gather_rows: torch.Tensor | None  # [T] int64, buffer row per token: slot + 1 if gathered, else 0
    gather_rows_cpu: torch.Tensor | None  # [T] int64 (CPU), the same, for building plans without a device sync
    unmerged_runs: tuple[tuple[int, int], ...]  # (start, end) of maximal runs of tokens not in MERGED_SLOT
    _plans: dict[tuple, GatherPlan] = field(default_factory=dict, init=False, repr=False)

    def gather_plan(self, ranks: Mapping[int, int], in_features: int, granules: int, width: int) -> GatherPlan:
        """The plan for buffers of `granules` granules of `width` ranks, given each gathered slot's rank there.

        Built once per step for each distinct layout, usually shared by every layer.
        """
        key = (in_features, granules, width, tuple(sorted(ranks.items())))
        if key not in self._plans:
            rows, device = self.gather_rows_cpu, self.token_slots.device
            self._plans[key] = build_gather_plan(rows, ranks, in_features, granules, width, device)
        return self._plans[key]


def find_segments(token_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split per-token slots into maximal runs of equal slot: `seg_starts [S + 1]`, `seg_slots [S]`."""
    slots = token_slots.cpu()
    if slots.numel() == 0:
        return torch.zeros(1, dtype=torch.int64), slots
    change = torch.nonzero(slots[1:] != slots[:-1]).flatten() + 1
    seg_starts = torch.cat([torch.zeros(1, dtype=torch.int64), change, torch.tensor([slots.numel()])])
    return seg_starts, slots[seg_starts[:-1]]


def make_lora_batch(token_slots: torch.Tensor, min_gemm_run: int = MIN_GEMM_RUN) -> LoraBatch:
    """Route one step: adapter runs of `min_gemm_run` tokens or more get GEMMs, the other adapter tokens are gathered.

    `token_slots` [T] may live on the model's device (one host copy is made); slots must be < the layers' `max_loras`.
    """
    slots = token_slots.cpu()
    seg_starts, seg_slots = find_segments(slots)
    lengths = seg_starts.diff()
    starts = seg_starts[:-1].tolist()
    runs = [
        (s, s + n, slot) for s, n, slot in zip(starts, lengths.tolist(), seg_slots.tolist(), strict=True) if slot >= 0
    ]
    gathered = torch.repeat_interleave(lengths < min_gemm_run, lengths) & (slots >= 0)  # [T]
    rows = torch.where(gathered, slots + 1, 0) if bool(gathered.any()) else None
    return LoraBatch(
        token_slots=token_slots,
        seg_starts=seg_starts,
        seg_slots=seg_slots,
        active_slots=frozenset(slot for _, _, slot in runs),
        gemm_runs=tuple(run for run in runs if run[1] - run[0] >= min_gemm_run),
        gather_slots=frozenset(slot for start, end, slot in runs if end - start < min_gemm_run),
        gather_rows=None if rows is None else rows.to(token_slots.device),
        gather_rows_cpu=rows,
        unmerged_runs=_unmerged_runs(seg_starts, seg_slots),
    )


def _unmerged_runs(seg_starts: torch.Tensor, seg_slots: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """Maximal runs of tokens that do not belong to the merged adapter: they get its correction."""
    runs: list[tuple[int, int]] = []
    bounds = zip(seg_starts[:-1].tolist(), seg_starts[1:].tolist(), seg_slots.tolist(), strict=True)
    for start, end, slot in bounds:
        if slot == MERGED_SLOT:
            continue
        if runs and runs[-1][1] == start:
            start = runs.pop()[0]
        runs.append((start, end))
    return tuple(runs)


def lora_delta_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """Each token's adapter delta in plain torch: the ground truth the fast paths are tested against.

    Semantics:
        y = zeros(T, out)
        for t in range(T):
            if token_slots[t] >= 0:
                y[t] += (x[t] @ a[token_slots[t]].T) @ b[token_slots[t]].T

    Args:
        x: [T, in] token activations.
        a: [N, r_max, in] stacked A of every slot, zero-padded to the largest rank.
        b: [N, out, r_max] stacked B of every slot (scale folded in), zero-padded likewise.
        token_slots: [T] slot of each token, -1 = base (no delta).
    """
    y = x.new_zeros(x.shape[0], b.shape[1])
    for t, slot in enumerate(token_slots.tolist()):
        if slot >= 0:
            y[t] += (x[t] @ a[slot].T) @ b[slot].T
    return y


def _capacity(rank: int) -> int:
    """Buffer rank capacity: a multiple of 8 up to one granule, then whole granules."""
    step = RANK_ALIGN if rank <= GRANULE else GRANULE
    return -(-rank // step) * step


def _granules(a_t: torch.Tensor) -> torch.Tensor:
    """[rows, in, cap] -> [rows, cap // g, in, g] with g = min(cap, GRANULE): the shrink gathers rows of g ranks."""
    rows, in_features, cap = a_t.shape
    width = min(cap, GRANULE)
    return a_t.view(rows, in_features, cap // width, width).transpose(1, 2).contiguous()


class _Slice:
    """One fused projection's slot buffers: A and B of every slot, zero-padded to a shared rank capacity."""

    def __init__(self, start: int, end: int, in_features: int, max_loras: int, weight: torch.Tensor) -> None:
        self.start, self.end, self.in_features, self.rows = start, end, in_features, max_loras + 1
        self.dtype, self.device = weight.dtype, weight.device
        self.rank: dict[int, int] = {}  # slot -> rank, for the slots whose adapter targets this projection
        self.dora: set[int] = set()  # slots whose adapter is DoRA
        self.cap = 0  # rank capacity of the buffers; 0 until an adapter targets this projection
        self.a_t = torch.empty(0)  # [N + 1, cap // g, in, g], Aᵀ per row in granules of g ranks; row 0 = base
        self.b_t = torch.empty(0)  # [N + 1, cap, out], (s·B)ᵀ per row
        self.g = torch.empty(0)  # [N + 1, out], DoRA factor per row, 1 for LoRA and base

    @property
    def out_features(self) -> int:
        return self.end - self.start

    @property
    def width(self) -> int:
        return self.a_t.shape[-1]

    def check(self, weights: LoraWeights) -> None:
        r = weights.a.shape[0]
        g_ok = weights.g is None or weights.g.shape == (self.out_features,)
        if weights.a.shape != (r, self.in_features) or weights.b.shape != (self.out_features, r) or not g_ok:
            raise ValueError(f"LoRA shapes {tuple(weights.a.shape)}, {tuple(weights.b.shape)} do not fit this layer")

    def load(self, slot: int, weights: LoraWeights | None) -> None:
        row = slot + 1
        self.rank.pop(slot, None)
        self.dora.discard(slot)
        if self.cap:
            self.a_t[row].zero_()
            self.b_t[row].zero_()
            self.g[row].fill_(1)
        if weights is None:
            return
        r = weights.a.shape[0]
        self._reserve(r)
        for granule, first in enumerate(range(0, r, self.width)):
            part = weights.a[first : first + self.width]  # [<= g, in]
            self.a_t[row, granule, :, : part.shape[0]].copy_(part.T)
        self.b_t[row, :r].copy_(weights.b.T)
        if weights.g is not None:
            self.g[row].copy_(weights.g)
            self.dora.add(slot)
        self.rank[slot] = r

    def _reserve(self, rank: int) -> None:
        cap = _capacity(rank)
        if cap <= self.cap:
            return
        opts = {"dtype": self.dtype, "device": self.device}
        a_t = torch.zeros(self.rows, self.in_features, cap, **opts)
        b_t = torch.zeros(self.rows, cap, self.out_features, **opts)
        if self.cap:
            a_t[:, :, : self.cap] = self.a_t.transpose(1, 2).reshape(self.rows, self.in_features, self.cap)
            b_t[:, : self.cap] = self.b_t
        else:
            self.g = torch.ones(self.rows, self.out_features, **opts)
        self.a_t, self.b_t, self.cap = _granules(a_t), b_t, cap

    def sgmv(self, x: torch.Tensor, y: torch.Tensor, start: int, end: int, slot: int) -> None:
        """One run of one slot: two GEMMs at the slot's own rank, then DoRA's `g` if any."""
        r, row = self.rank[slot], slot + 1
        granules = -(-r // self.width)
        xa = torch.matmul(x[start:end], self.a_t[row, :granules])  # [k, L, g]
        xa = xa.transpose(0, 1).reshape(end - start, -1)[:, :r]  # [L, r]
        ys = y[start:end, self.start : self.end]  # [L, out]
        ys.addmm_(xa, self.b_t[row, :r])
        if slot in self.dora:
            ys.mul_(self.g[row])

    def bgmv(self, x: torch.Tensor, y: torch.Tensor, batch: LoraBatch) -> None:
        """Every gathered token at once, each at its own slot's rank; no loop over adapters."""
        ranks = {slot: self.rank[slot] for slot in batch.gather_slots if slot in self.rank}
        if not ranks:
            return
        plan = batch.gather_plan(ranks, self.in_features, self.a_t.shape[1], self.width)
        xs = x.index_select(0, plan.bag_tokens)  # [B, in]
        a_rows = self.a_t.view(-1, self.width)  # [(N + 1) * cap // g * in, g]
        xa = F.embedding_bag(plan.shrink_index, a_rows, mode="sum", per_sample_weights=xs)  # [B, g]
        xa = xa.view(-1).index_select(0, plan.expand_inputs)  # [E]
        b_rows = self.b_t.view(-1, self.out_features)  # [(N + 1) * cap, out]
        delta = F.embedding_bag(plan.expand_index, b_rows, plan.expand_offsets, mode="sum", per_sample_weights=xa)
        ys = y[:, self.start : self.end]  # [T, out]
        ys.add_(delta)
        if not self.dora.isdisjoint(ranks):
            ys.mul_(F.embedding(batch.gather_rows, self.g))


class LoraSlots:
    """Adapter weights of `max_loras` device slots on one `TargetLinear`, and the step's per-token deltas."""

    def __init__(self, linear: TargetLinear, max_loras: int) -> None:
        self.max_loras = max_loras
        self.correction: Correction | None = None  # of the adapter merged into this layer's weight, if any
        self._slices = {
            name: _Slice(start, end, linear.in_features, max_loras, linear.weight)
            for name, (start, end) in linear.slices.items()
        }

    def check_slot(self, slot: int, weights: Mapping[str, LoraWeights]) -> None:
        """Raise `ValueError` unless `load_slot(slot, weights)` fits this layer; nothing is changed."""
        if not 0 <= slot < self.max_loras:
            raise ValueError(f"slot {slot} is outside 0..{self.max_loras - 1}")
        self.check_updates(weights)

    def check_updates(self, weights: Mapping[str, LoraWeights]) -> None:
        """Raise `ValueError` unless every update names a projection of this layer and has its shapes."""
        unknown = set(weights) - set(self._slices)
        if unknown:
            raise ValueError(f"this layer has no projection named {sorted(unknown)}")
        for name, update in weights.items():
            self._slices[name].check(update)

    def load_slot(self, slot: int, weights: Mapping[str, LoraWeights]) -> None:
        """Make `slot` hold exactly `weights` (projection name -> update); projections not named get no update."""
        self.check_slot(slot, weights)
        for name, piece in self._slices.items():
            piece.load(slot, weights.get(name))

    def clear_slot(self, slot: int) -> None:
        self.load_slot(slot, {})

    def apply(self, x: torch.Tensor, y: torch.Tensor, batch: LoraBatch) -> torch.Tensor:
        """Add every token's delta to `y` in place: `y_slice = g ⊙ (y_slice + (x·Aᵀ)·(s·B)ᵀ)`, g = 1 unless DoRA.

        With an adapter merged, the other tokens' `y` is first corrected back to the base model's.
        """
        # x: [T, in], y: [T, out]
        if self.correction is not None and batch.unmerged_runs:
            self.correction.apply(x, y, batch.unmerged_runs)
        slices = [s for s in self._slices.values() if not batch.active_slots.isdisjoint(s.rank)]
        if not slices:
            return y
        if batch.gather_rows is not None:
            for piece in slices:
                piece.bgmv(x, y, batch)
        for start, end, slot in batch.gemm_runs:
            for piece in slices:
                if slot in piece.rank:
                    piece.sgmv(x, y, start, end, slot)
        return y
