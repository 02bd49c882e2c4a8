"""Per-token LoRA/DoRA deltas for a packed batch that mixes many adapters.

An adapter-aware `TargetLinear` owns a `LoraSlots`: for each fused projection, Aᵀ and (s·B)ᵀ of `max_loras` device
slots, zero-padded to a shared rank capacity, and DoRA's factor `g` per slot (1 for LoRA), in the rows of slot buffers
(`server.model.routing.buffer_row`; row 0 is all zeros and stands for the base model). The maths of one update is
`server.model.lora_weights.LoraWeights`; `lora_reference` states what this module computes, as a loop over tokens.

A step's tokens come in runs of equal slot. Runs of `MIN_GEMM_RUN` tokens or more (prefill) are served by GEMMs
(Punica's SGMV): all runs whose slots read the same number of A granules share one batched GEMM pair per projection
(a lone run gets its own pair): a few large ops that can use every core instead of many small ones that cannot;
0.87x the time of one pair per run on one thread for 32 runs of 64 tokens (bench/bench_kernels.py). All other
adapter tokens (decode) are served together by two `embedding_bag` calls that read each token's rows of A and B
straight out of the slot buffers, each token at its own rank (Punica's BGMV with the gather fused into the
reduction: no copy of per-token weights, no loop over adapters). With the fused bf16 kernels (`server.model.kernels`)
one C++ op per projection does the same, in float32 with one rounding, and needs no index plan; filling a slot is
one C++ op per projection too (`lora_fill`: 1.6-4x faster than a dozen torch ops beside a busy adapter loader,
`bench/bench_slot_fill.py`), the torch ops (`_Slice._copy`) serving every other dtype and device.

Measured on this CPU (1 thread; 2 threads on a quiet machine in brackets), one decode step of 32 tokens on 32
distinct r=8 adapters on q_proj and v_proj of SmolLM2-135M, per layer: qkv base GEMM 350 µs [186]; gathered
`torch.bmm` 420 µs [280]; a GEMM pair per run 980 µs [1170]; this path 195 µs [145], about the cost of reading those
adapters' 2.0 MB of A and B once (the qkv weight is 2.2 MB). A is stored in granules of `GRANULE` ranks, so a resident
r=64 slot costs r=8 tokens little (267 µs; padding them to 64 cost 3-4x). One run is cheaper as a GEMM pair than
gathered from about 12-16 tokens up.

While an adapter is merged into the base weights (`server.model.merge`), its tokens carry `MERGED_SLOT`: nothing is
added to them, and every other token first has the merged update removed (`LoraWeights.remove`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from server.model import backend
from server.model.gemm_shapes import padded_rows, runs_onednn
from server.model.lora_weights import LoraWeights, scale_outputs_
from server.model.routing import MERGED_SLOT, LoraBatch, buffer_row, buffer_rows

RANK_ALIGN = 8  # slot buffers grow in steps of this many ranks up to one granule
GRANULE = 16  # the shrink gathers A in rows of at most this many ranks, so one wide slot slows the rest little


def lora_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    updates: Mapping[int, LoraWeights],
    token_slots: torch.Tensor,
    merged: LoraWeights | None = None,
) -> torch.Tensor:
    """Every token's adapter update of one projection in plain torch: the ground truth the fast paths are tested on.

    Semantics:
        for t in range(T):
            if merged is not None and token_slots[t] != MERGED_SLOT:
                y[t] = y[t] / merged.g - (x[t] @ merged.a.T) @ merged.b.T    # back to the base model's output
            w = updates.get(token_slots[t])                                  # None for the base model
            if w is not None:
                y[t] = w.g * (y[t] + (x[t] @ w.a.T) @ w.b.T)
        (g = 1 for plain LoRA, in both lines)

    Args:
        x: [T, in] token activations.
        y: [T, out] the projection's output `x·Wᵀ` (`x·W'ᵀ` while `merged` is merged into W); updated in place.
        updates: adapter slot -> its update of this projection; slots not in it add nothing.
        token_slots: [T] adapter slot of each token, or BASE_SLOT / MERGED_SLOT.
        merged: the update merged into the weight, if any.
    """
    for t, slot in enumerate(token_slots.tolist()):
        if merged is not None and slot != MERGED_SLOT:
            merged.remove(x[t : t + 1], y[t : t + 1])
        if slot in updates:
            updates[slot].apply(x[t : t + 1], y[t : t + 1])
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

    def __init__(self, start: int, end: int, in_features: int, rows: int, dtype: torch.dtype, device: torch.device,
                 fused: bool) -> None:  # fmt: skip
        self.start, self.end, self.in_features, self.rows = start, end, in_features, rows
        self.dtype, self.device, self.fused = dtype, device, fused
        self.rank: dict[int, int] = {}  # slot -> rank, for the slots whose adapter targets this projection
        self.row_ranks = torch.zeros(rows, dtype=torch.int64, device=device)  # rank per buffer row, 0 = none
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
        weights.check_shape(self.in_features, self.out_features)

    def load(self, slot: int, weights: LoraWeights | None) -> None:
        """Make the slot's row hold `weights` (None: no update). A row is zero past its slot's rank and its `g` is 1
        unless DoRA, so only what the previous adapter wrote is cleared: on the engine thread, a fill is a copy."""
        row = buffer_row(slot)
        held = self.rank.pop(slot, 0)
        if weights is None and not held:
            return
        r = 0 if weights is None else weights.rank
        self._reserve(r)
        if slot in self.dora:
            self.dora.discard(slot)
            self.g[row].fill_(1)
        if self.fused:
            a, b = (None, None) if weights is None else (weights.a, weights.b)
            torch.ops.loraplex.lora_fill(self.a_t, self.b_t, self.row_ranks, row, held, a, b)
        else:
            self._copy(row, held, weights)
        if weights is None:
            return
        if weights.g is not None:
            self.g[row].copy_(weights.g)
            self.dora.add(slot)
        self.rank[slot] = r

    def _copy(self, row: int, held: int, weights: LoraWeights | None) -> None:
        """`load`'s copies in torch ops: A and B into the row, ranks up to `held` cleared, the row's rank set."""
        r = 0 if weights is None else weights.rank
        full, rest = divmod(r, self.width)  # whole granules of A, then the ranks of a partial one
        if held > full * self.width:  # what the copies below leave of the old adapter
            self.a_t[row, full : -(-held // self.width)].zero_()
        if held > r:
            self.b_t[row, r:held].zero_()
        self.row_ranks[row] = r
        if weights is None:
            return
        if full:
            granules = weights.a[: full * self.width].reshape(full, self.width, self.in_features)
            self.a_t[row, :full].copy_(granules.transpose(1, 2))
        if rest:
            self.a_t[row, full, :, :rest].copy_(weights.a[full * self.width :].T)
        self.b_t[row, :r].copy_(weights.b.T)

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
        """One run of one slot: two GEMMs over the slot's granules (ranks past its own are zero in A and B), then
        DoRA's `g` if any. Where oneDNN computes them the run is padded to `padded_rows`, so it meets few shapes.
        """
        row, rows = buffer_row(slot), end - start
        granules = -(-self.rank[slot] // self.width)
        padded = padded_rows(rows) if runs_onednn(x) else rows
        xs = x[start:end] if padded == rows else F.pad(x[start:end], (0, 0, 0, padded - rows))
        xa = torch.matmul(xs, self.a_t[row, :granules])  # [k, P, g]
        xa = xa.transpose(0, 1).reshape(padded, -1)  # [P, k * g]
        b = self.b_t[row, : granules * self.width]  # [k * g, out]
        ys = y[start:end, self.start : self.end]  # [L, out]
        if padded == rows:
            ys.addmm_(xa, b)
        else:
            ys.copy_(torch.addmm(F.pad(ys, (0, 0, 0, padded - rows)), xa, b)[:rows])
        if slot in self.dora:
            scale_outputs_(ys, self.g[buffer_row(slot)])

    def grouped_sgmv(
        self, x: torch.Tensor, y: torch.Tensor, runs: list[tuple[int, int, int]], batch: LoraBatch
    ) -> None:
        """Runs whose slots read the same number of A granules: one batched GEMM pair for all of them.

        Each run is padded to the longest (to `padded_rows` of it where oneDNN computes) and every slot to
        `granules · g` ranks; the padding of A and B is zero, so it adds exact zeros.
        """
        granules = -(-self.rank[runs[0][2]] // self.width)
        ranks = granules * self.width
        plan = batch.runs_plan(tuple((start, end) for start, end, _ in runs), padded=runs_onednn(x))
        rows = torch.tensor([buffer_row(slot) for _, _, slot in runs], device=x.device)
        n = len(runs)
        a = self.a_t.index_select(0, rows)[:, :granules]  # [n, k, in, g]
        a = a.permute(0, 2, 1, 3).reshape(n, self.in_features, ranks)  # [n, in, k * g]
        b = self.b_t.index_select(0, rows)[:, :ranks]  # [n, k * g, out]
        ys = y[:, self.start : self.end]  # [T, out]
        if plan.pad_index is None:
            xs = x[plan.first : plan.last].view(n, plan.length, -1)  # [n, L, in]
            ys[plan.first : plan.last].view(n, plan.length, -1).baddbmm_(torch.bmm(xs, a), b)
        else:
            xs = x.index_select(0, plan.pad_index).view(n, plan.length, -1)  # [n, L, in]
            delta = torch.bmm(torch.bmm(xs, a), b).view(-1, self.out_features)  # [n * L, out]
            ys.index_add_(0, plan.tokens, delta.index_select(0, plan.kept))
        for start, end, slot in runs:
            if slot in self.dora:
                scale_outputs_(ys[start:end], self.g[buffer_row(slot)])

    def gemm_runs(self, x: torch.Tensor, y: torch.Tensor, batch: LoraBatch) -> None:
        """Every GEMM-served run of a slot targeting this projection: grouped by granule count, lone runs alone."""
        groups: dict[int, list[tuple[int, int, int]]] = {}
        for run in batch.gemm_runs:
            if run[2] in self.rank:
                groups.setdefault(-(-self.rank[run[2]] // self.width), []).append(run)
        for runs in groups.values():
            if len(runs) == 1:
                self.sgmv(x, y, *runs[0])
            else:
                self.grouped_sgmv(x, y, runs, batch)

    def bgmv(self, x: torch.Tensor, y: torch.Tensor, batch: LoraBatch) -> None:
        """Every gathered token at once, each at its own slot's rank; no loop over adapters."""
        ranks = {slot: self.rank[slot] for slot in batch.gather_slots if slot in self.rank}
        if not ranks:
            return
        ys = y[:, self.start : self.end]  # [T, out]
        if self.fused:
            torch.ops.loraplex.lora_gather(x, y, batch.gather_rows, self.row_ranks, self.a_t, self.b_t, self.start)
        else:
            self._bgmv_bags(x, ys, batch, ranks)
        if not self.dora.isdisjoint(ranks):
            scale_outputs_(ys, F.embedding(batch.gather_rows, self.g))

    def _bgmv_bags(self, x: torch.Tensor, ys: torch.Tensor, batch: LoraBatch, ranks: dict[int, int]) -> None:
        plan = batch.gather_plan(ranks, self.in_features, self.a_t.shape[1], self.width)
        xs = x.index_select(0, plan.bag_tokens)  # [B, in]
        a_rows = self.a_t.view(-1, self.width)  # [(N + 1) * cap // g * in, g]
        xa = F.embedding_bag(plan.shrink_index, a_rows, mode="sum", per_sample_weights=xs)  # [B, g]
        xa = xa.view(-1).index_select(0, plan.expand_inputs)  # [E]
        b_rows = self.b_t.view(-1, self.out_features)  # [(N + 1) * cap, out]
        delta = F.embedding_bag(plan.expand_index, b_rows, plan.expand_offsets, mode="sum", per_sample_weights=xa)
        ys.add_(delta)


class LoraSlots:
    """Adapter weights of `max_loras` device slots on one fused layer, and the step's per-token deltas.

    Built from the layer's shapes: `slices` maps each fused projection to its output columns `[start, end)`.
    """

    def __init__(self, slices: Mapping[str, tuple[int, int]], in_features: int, max_loras: int, dtype: torch.dtype,
                 device: torch.device, fused: bool = False) -> None:  # fmt: skip
        self.max_loras = max_loras
        self.correction: dict[str, LoraWeights] | None = None  # the merged adapter's updates, removed for the others
        rows = buffer_rows(max_loras)
        self._slices = {
            name: _Slice(start, end, in_features, rows, dtype, device, fused) for name, (start, end) in slices.items()
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
        self.write_slot(slot, weights)

    def write_slot(self, slot: int, weights: Mapping[str, LoraWeights]) -> None:
        """`load_slot` for updates `check_slot` has passed (a whole model's are checked before any layer changes)."""
        for name, piece in self._slices.items():
            piece.load(slot, weights.get(name))

    def clear_slot(self, slot: int) -> None:
        self.load_slot(slot, {})

    def set_correction(self, merged: Mapping[str, LoraWeights] | None) -> None:
        """Remove the updates of the adapter merged into the layer's weight (None: none is) from every other token."""
        if merged is None:
            self.correction = None
            return
        self.check_updates(merged)
        piece = next(iter(self._slices.values()))
        opts = {"device": piece.device, "dtype": piece.dtype}  # updates may live in host memory
        self.correction = {name: update.to(**opts) for name, update in merged.items()}

    def apply(self, x: torch.Tensor, y: torch.Tensor, batch: LoraBatch) -> torch.Tensor:
        """Add every token's delta to `y` in place: `y_slice = g ⊙ (y_slice + (x·Aᵀ)·(s·B)ᵀ)`, g = 1 unless DoRA.

        With an adapter merged, the other tokens' `y` is first corrected back to the base model's.
        """
        # x: [T, in], y: [T, out]
        if backend.triton_kernels(x.device):
            return self._apply_triton(x, y, batch)
        if self.correction is not None and batch.unmerged_runs:
            self._correct(x, y, batch.unmerged_runs)
        slices = [s for s in self._slices.values() if not batch.active_slots.isdisjoint(s.rank)]
        if not slices:
            return y
        if batch.gather_rows is not None:
            for piece in slices:
                piece.bgmv(x, y, batch)
        if batch.gemm_runs:
            for piece in slices:
                piece.gemm_runs(x, y, batch)
        return y

    def _apply_triton(self, x: torch.Tensor, y: torch.Tensor, batch: LoraBatch) -> torch.Tensor:
        """`apply` as one shrink and one expand launch per projection (`server.model.triton.lora`)."""
        from server.model.triton import lora as kernels  # Triton is imported only where its kernels run

        segs = kernels.segments(batch, self.max_loras)
        if self.correction is not None and batch.unmerged_runs:
            for name, update in self.correction.items():
                kernels.remove_merged(x, y, update, self._slices[name].start, segs)
        for piece in self._slices.values():
            if batch.active_slots.isdisjoint(piece.rank):
                continue
            g = None if piece.dora.isdisjoint(batch.active_slots) else piece.g
            weights = kernels.SlotWeights.of_slots(piece.a_t, piece.b_t, g, piece.row_ranks)
            kernels.apply_adapters(x, y, weights, piece.start, piece.out_features, segs)
        return y

    def _correct(self, x: torch.Tensor, y: torch.Tensor, runs: tuple[tuple[int, int], ...]) -> None:
        """`y[t, slice] = y[t, slice] / g − (x[t]·Aᵀ)·(s·B)ᵀ` for every token t of `runs` ([first, last))."""
        for name, update in self.correction.items():
            piece = self._slices[name]
            for first, last in runs:
                update.remove(x[first:last], y[first:last, piece.start : piece.end])
