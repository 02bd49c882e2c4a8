"""Mixed-adapter LoRA/DoRA in Triton: one shrink and one expand launch per projection for every adapter of a step.

Semantics are `server.model.lora.lora_reference`'s. A step's tokens are sorted by adapter slot once (shared by every
layer, `segments`): segment j holds the tokens of slot j, contiguous in `order`. The shrink writes `xa = x·Aᵀ` for
each token at its own slot's rank; the expand adds `xa·(s·B)ᵀ` to the projection's columns of y and applies DoRA's
factor in the epilogue (`y = g ⊙ (y + Δ)`). As in vLLM's V1 `lora_shrink`/`lora_expand`, the grid covers every slot
and every block of tokens a slot could have, and programs past their segment's length or their slot's rank return at
once: nothing waits on the host, empty segments cost one load, and rank blocks past a slot's own rank are never
computed, so an r=8 adapter is not padded to a resident r=64 one. The merged adapter's correction (`y = y / g − Δ`
for every token not of the merged adapter) is the same two kernels over one segment.

Slot buffers are read in place in `server.model.lora`'s layout: Aᵀ as [rows, cap // w, in, w] granules, (s·B)ᵀ as
[rows, cap, out], g as [rows, out]; row `buffer_row(slot)`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from server.model.lora_weights import LoraWeights
from server.model.routing import MERGED_SLOT, LoraBatch

BLOCK_R = 16  # ranks per program of the shrink, per loop step of the expand
BLOCK_K = 64  # input features per loop step of the shrink
BLOCK_N = 64  # output features per program of the expand


@dataclass
class Segments:
    """A step's tokens sorted by adapter slot, on the device; built once per step and slot count."""

    order: torch.Tensor  # [T] int32, token indices sorted by slot: merged-adapter tokens, base tokens, slot 0, 1, ...
    starts: torch.Tensor  # [N] int32, first position in `order` of slot j's tokens
    counts: torch.Tensor  # [N] int32, tokens of slot j (0: an empty segment)
    rows: torch.Tensor  # [N] int32, slot-buffer row of slot j
    unmerged_start: torch.Tensor  # [1] int32, first position in `order` of a token not of the merged adapter
    unmerged_count: torch.Tensor  # [1] int32, tokens not of the merged adapter
    block_m: int  # tokens per program


_segments: weakref.WeakKeyDictionary[LoraBatch, dict[int, Segments]] = weakref.WeakKeyDictionary()


def segments(batch: LoraBatch, max_loras: int) -> Segments:
    """The step's sorted segments for `max_loras` slots, computed on the device once and shared by every layer."""
    per_batch = _segments.setdefault(batch, {})
    if max_loras not in per_batch:
        per_batch[max_loras] = _build_segments(batch.token_slots, max_loras)
    return per_batch[max_loras]


def _build_segments(token_slots: torch.Tensor, max_loras: int) -> Segments:
    key = token_slots - MERGED_SLOT  # merged 0, base 1, slot j at j + 2: adapter tokens sort after the others
    order = torch.sort(key, stable=True).indices.to(torch.int32)
    # [N + 2]; a scatter, not bincount, which reads the largest key back to the host (a sync, and no graph capture)
    counts = torch.zeros(max_loras + 2, dtype=torch.int64, device=key.device).scatter_add_(0, key, torch.ones_like(key))
    starts = torch.cumsum(counts, 0) - counts
    num_tokens = token_slots.shape[0]
    as_int = {"dtype": torch.int32}
    return Segments(
        order=order,
        starts=starts[2:].to(**as_int),
        counts=counts[2:].to(**as_int),
        rows=torch.arange(1, max_loras + 1, device=token_slots.device, **as_int),
        unmerged_start=starts[1:2].to(**as_int),
        unmerged_count=(num_tokens - counts[:1]).to(**as_int),
        block_m=16 if num_tokens < 1024 else 64,
    )


@triton.jit
def _shrink_kernel(
    x, a, xa, order, seg_starts, seg_counts, seg_rows, ranks, in_features, granule,
    sx_t, sx_k, sa_row, sa_gran, sa_in, sa_w, sxa_t, sxa_r,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """xa[t, r] = x[t]·A[row, r] for the tokens t of one segment, ranks [pid_r · BLOCK_R, ...) below the row's rank."""
    pid_m, pid_r, seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    count = tl.load(seg_counts + seg)
    row = tl.load(seg_rows + seg)
    rank = tl.load(ranks + row)
    if pid_m * BLOCK_M >= count or pid_r * BLOCK_R >= rank:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < count
    tokens = tl.load(order + tl.load(seg_starts + seg) + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    a_cols = (offs_r // granule) * sa_gran + (offs_r % granule) * sa_w  # where rank r lives in a granule row
    a_row = a + row.to(tl.int64) * sa_row
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < in_features
        x_mask = m_mask[:, None] & k_mask[None, :]
        x_tile = tl.load(x + tokens[:, None] * sx_t + offs_k[None, :] * sx_k, mask=x_mask, other=0.0)
        a_mask = k_mask[:, None] & r_mask[None, :]
        a_tile = tl.load(a_row + offs_k[:, None] * sa_in + a_cols[None, :], mask=a_mask, other=0.0)
        if UPCAST:
            x_tile, a_tile = x_tile.to(tl.float32), a_tile.to(tl.float32)
        acc += tl.dot(x_tile, a_tile, input_precision=PRECISION)
    tl.store(xa + tokens[:, None] * sxa_t + offs_r[None, :] * sxa_r, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_kernel(
    xa, b, y, g, order, seg_starts, seg_counts, seg_rows, ranks, out_features, y_col,
    sxa_t, sxa_r, sb_row, sb_r, sb_n, sy_t, sy_n, sg_row, sg_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, HAS_G: tl.constexpr,
    REMOVE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """y[t, y_col + n] = g ⊙ (y + xa[t]·B[row]ᵀ), or with REMOVE y / g − xa[t]·B[row]ᵀ, for one segment's tokens."""
    pid_m, pid_n, seg = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    count = tl.load(seg_counts + seg)
    row = tl.load(seg_rows + seg)
    rank = tl.load(ranks + row)
    if pid_m * BLOCK_M >= count or rank == 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < count
    tokens = tl.load(order + tl.load(seg_starts + seg) + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < out_features
    b_row = b + row.to(tl.int64) * sb_row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):  # the row's own rank: no work for ranks it does not have
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        xa_mask = m_mask[:, None] & r_mask[None, :]
        xa_tile = tl.load(xa + tokens[:, None] * sxa_t + offs_r[None, :] * sxa_r, mask=xa_mask, other=0.0)
        b_mask = r_mask[:, None] & n_mask[None, :]
        b_tile = tl.load(b_row + offs_r[:, None] * sb_r + offs_n[None, :] * sb_n, mask=b_mask, other=0.0)
        xa_tile = xa_tile.to(b_tile.dtype)  # rounded as the reference rounds x·Aᵀ
        if UPCAST:
            xa_tile, b_tile = xa_tile.to(tl.float32), b_tile.to(tl.float32)
        acc += tl.dot(xa_tile, b_tile, input_precision=PRECISION)
    mask = m_mask[:, None] & n_mask[None, :]
    y_ptrs = y + tokens[:, None] * sy_t + (y_col + offs_n[None, :]) * sy_n
    out = tl.load(y_ptrs, mask=mask).to(tl.float32)
    if HAS_G:
        factor = tl.load(g + row.to(tl.int64) * sg_row + offs_n * sg_n, mask=n_mask, other=1.0).to(tl.float32)
        out = out / factor[None, :] - acc if REMOVE else (out + acc) * factor[None, :]
    else:
        out = out - acc if REMOVE else out + acc
    tl.store(y_ptrs, out.to(y.dtype.element_ty), mask=mask)


@dataclass
class SlotWeights:
    """One projection's weights as the kernels read them: strides of A, B, g by (row, rank, feature)."""

    a: torch.Tensor  # Aᵀ granules [rows, cap // w, in, w], or one update's A [r, in]
    a_strides: tuple[int, int, int, int]  # row, granule, input feature, rank within the granule
    granule: int  # ranks per granule
    b: torch.Tensor  # (s·B)ᵀ [rows, cap, out], or one update's (s·B) [out, r]
    b_strides: tuple[int, int, int]  # row, rank, output feature
    g: torch.Tensor | None  # DoRA factors [rows, out] or [out]; None when no token of the step has one
    g_strides: tuple[int, int]  # row, output feature
    ranks: torch.Tensor  # [rows] rank per row (0: no update)
    cap: int  # largest rank

    @classmethod
    def of_slots(cls, a_t: torch.Tensor, b_t: torch.Tensor, g: torch.Tensor | None, ranks: torch.Tensor) -> SlotWeights:
        g_strides = (0, 0) if g is None else (g.stride(0), g.stride(1))
        return cls(a_t, a_t.stride(), a_t.shape[-1], b_t, b_t.stride(), g, g_strides, ranks, b_t.shape[1])

    @classmethod
    def of_update(cls, update: LoraWeights) -> SlotWeights:
        """One update as row 0 of a one-row buffer (the merged adapter's correction)."""
        a, b, rank = update.a, update.b, update.rank
        ranks = torch.full((1,), rank, dtype=torch.int64, device=a.device)
        g_strides = (0, 0) if update.g is None else (0, update.g.stride(0))
        return cls(a, (0, 0, a.stride(1), a.stride(0)), rank, b, (0, b.stride(1), b.stride(0)), update.g, g_strides,
                   ranks, rank)  # fmt: skip


def shrink_expand(
    x: torch.Tensor, y: torch.Tensor, w: SlotWeights, col: int, out_features: int, segs: Segments,
    seg_starts: torch.Tensor, seg_counts: torch.Tensor, seg_rows: torch.Tensor, remove: bool = False,
) -> None:  # fmt: skip
    """Two launches: `xa = x·Aᵀ` then `y[:, col : col + out] = g ⊙ (y + xa·(s·B)ᵀ)` (REMOVE: `y / g − xa·(s·B)ᵀ`)."""
    # x: [T, in], y: [T, out_total]
    num_tokens, in_features = x.shape
    num_segs = seg_rows.shape[0]
    if num_tokens == 0 or w.cap == 0:
        return
    precision = "ieee" if x.dtype == torch.float32 else None  # float32 stays exact: no tf32
    # Triton's interpreter (3.9) multiplies bf16 tiles as their raw bits; there the dots run in float32
    upcast = bool(triton.knobs.runtime.interpret) and x.dtype != torch.float32
    xa = torch.empty(num_tokens, w.cap, dtype=torch.float32, device=x.device)  # [T, cap]; rows of other slots unread
    m_blocks = triton.cdiv(num_tokens, segs.block_m)
    _shrink_kernel[(m_blocks, triton.cdiv(w.cap, BLOCK_R), num_segs)](
        x, w.a, xa, segs.order, seg_starts, seg_counts, seg_rows, w.ranks, in_features, w.granule,
        x.stride(0), x.stride(1), *w.a_strides, xa.stride(0), xa.stride(1),
        BLOCK_M=segs.block_m, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, PRECISION=precision, UPCAST=upcast,
    )  # fmt: skip
    g = w.g if w.g is not None else y  # never read without HAS_G
    _expand_kernel[(m_blocks, triton.cdiv(out_features, BLOCK_N), num_segs)](
        xa, w.b, y, g, segs.order, seg_starts, seg_counts, seg_rows, w.ranks, out_features, col,
        xa.stride(0), xa.stride(1), *w.b_strides, y.stride(0), y.stride(1), *w.g_strides,
        BLOCK_M=segs.block_m, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, HAS_G=w.g is not None, REMOVE=remove,
        PRECISION=precision, UPCAST=upcast,
    )  # fmt: skip


def apply_adapters(x: torch.Tensor, y: torch.Tensor, w: SlotWeights, col: int, out_features: int,
                   segs: Segments) -> None:  # fmt: skip
    """Every adapter token's update of one projection, each slot at its own rank, in one launch pair."""
    shrink_expand(x, y, w, col, out_features, segs, segs.starts, segs.counts, segs.rows)


def remove_merged(x: torch.Tensor, y: torch.Tensor, update: LoraWeights, col: int, segs: Segments) -> None:
    """The merged adapter's correction of one projection for every token not of it: `y = y / g − Δ`."""
    rows = torch.zeros(1, dtype=torch.int32, device=x.device)
    w = SlotWeights.of_update(update)
    shrink_expand(x, y, w, col, update.b.shape[0], segs, segs.unmerged_start, segs.unmerged_count, rows, remove=True)
