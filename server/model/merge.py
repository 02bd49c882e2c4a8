"""Merge one adapter into the base weights and take it out again, exactly.

Merging X gives every layer X targets a merged weight `W' = W + s·B·A` on X's projections (DoRA:
`g ⊙ (W + s·B·A)`), computed in float32 into a buffer that the layer's GEMM then reads instead of `W`. The base
weight itself is never written: unmerging just stops reading the buffer, so after any number of cycles the base
weights are the very same tensors, bit for bit, unmerging costs no arithmetic, and views of them
(`ModelInfo.base_weight`, which DoRA factors are computed from) keep reading pristine values while X is merged.

A merge is bound by memory traffic: it reads the base rows of X's projections once and writes them once (r=8 on
q_proj and v_proj of SmolLM2-135M: 53 MB each way). Buffers are kept between merges, so that only the first merge
of a layer pays for allocating (and page-faulting) its buffer; each remembers which update its projections hold,
so merging the adapter merged last time again costs nothing, and another adapter's merge restores from `W` only
the rows it does not overwrite. On CPU the merged layers first run the plain GEMM (the faster one up to
`PLAIN_MAX_ROWS` rows); `pack_next`, one layer per engine step, then gives them oneDNN's packed copy for larger
batches, kept as long as the buffer's rows do not change. Buffers of layers the latest merge does not touch are
freed, so the extra memory is at most two copies (plain and packed) of the layers one adapter targets
(`WeightMerger.num_bytes`).

Tokens that do not use X must not see it. Each layer X touches gets a `Correction`, applied by `LoraSlots.apply`
before the tokens' own adapter deltas: `x·Wᵀ = (x·W'ᵀ) / g_X − x·(s·B·A)ᵀ` on X's projections (g_X = 1 for LoRA).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from server.model.linear import TargetLinear, prepack
from server.model.llama import LlamaModel
from server.model.lora import LoraWeights


@dataclass(frozen=True)
class _Piece:
    """The merged update of one projection, laid out for the correction."""

    start: int  # the projection's output columns [start, end) in the fused layer
    end: int
    a_t: torch.Tensor  # [in, r], a transposed view (BLAS reads it as it is)
    b_t: torch.Tensor  # [r, out_slice], likewise; scale folded in
    g: torch.Tensor | None  # [out_slice], DoRA factor; None for LoRA


class Correction:
    """Undo a merged adapter for the tokens that do not use it, on the projections it targets."""

    def __init__(self, linear: TargetLinear, pieces: Mapping[str, LoraWeights]) -> None:
        opts = {"device": linear.weight.device, "dtype": linear.weight.dtype}  # updates may live in host memory
        self._pieces = [
            _Piece(*linear.slices[name], w.a.to(**opts).T, w.b.to(**opts).T, None if w.g is None else w.g.to(**opts))
            for name, w in pieces.items()
        ]  # fmt: skip

    def apply(self, x: torch.Tensor, y: torch.Tensor, runs: tuple[tuple[int, int], ...]) -> None:
        """`y[t, slice] = y[t, slice] / g − (x[t]·Aᵀ)·(s·B)ᵀ` in place for every token t of `runs` ([first, last))."""
        # x: [T, in], y: [T, out]
        for piece in self._pieces:
            for first, last in runs:
                ys = y[first:last, piece.start : piece.end]  # [L, out_slice]
                if piece.g is not None:
                    ys.div_(piece.g)
                ys.addmm_(x[first:last] @ piece.a_t, piece.b_t, alpha=-1)


class _Buffer:
    """A layer's merged weight: equal to the base weight except on the projections in `held`."""

    def __init__(self, base: torch.Tensor) -> None:
        self.weight = base.clone()  # [out, in]
        self.held: dict[str, LoraWeights | None] = {}  # projection -> the update its rows hold (None: unknown)
        self.packed: torch.Tensor | None = None  # prepack(weight) as it is now; dropped whenever rows change

    def fill(self, base: torch.Tensor, slices: Mapping[str, tuple[int, int]], pieces: Mapping[str, LoraWeights],
             base_max: Mapping[str, float]) -> None:  # fmt: skip
        """Make the buffer `base` with `pieces` merged in; `ValueError` if that gives non-finite weights.

        Rows that already hold the very same update (the adapter merged last time) are left as they are.
        `base_max` holds max |W| of each projection's rows, for `_surely_finite`.
        """
        for name in sorted(self.held.keys() - pieces.keys()):
            start, end = slices[name]
            self.packed = None
            self.weight[start:end].copy_(base[start:end])
            del self.held[name]
        for name, update in pieces.items():
            if self.held.get(name) is update:
                continue
            start, end = slices[name]
            self.packed = None
            self.held[name] = None  # the rows are neither the base's nor a good merge until checked
            rows = self.weight[start:end]
            _merge_rows(base[start:end], update, rows)
            if not _surely_finite(base_max[name], update, rows.dtype) and not bool(torch.isfinite(rows).all()):
                raise ValueError(f"merging {name} gives non-finite weights")
            self.held[name] = update


class WeightMerger:
    """Merges one adapter at a time into a model's target layers and takes it out again, bit-exactly."""

    def __init__(self, model: LlamaModel) -> None:
        self._linears = model.target_linears()  # (layer, fused module name) -> layer
        self._buffers: dict[TargetLinear, _Buffer] = {}
        self._merged: list[TargetLinear] = []  # the layers the merged adapter replaced
        self._base_max: dict[TargetLinear, dict[str, float]] = {}  # max |W| per projection, measured once

    @property
    def is_merged(self) -> bool:
        return bool(self._merged)

    @property
    def merged_layers(self) -> tuple[TargetLinear, ...]:
        """The layers the merged adapter replaced (none while nothing is merged)."""
        return tuple(self._merged)

    @property
    def num_bytes(self) -> int:
        """Memory the merge buffers hold, their packed copies included."""
        copies = {buf: 1 if buf.packed is None else 2 for buf in self._buffers.values()}  # packed is as large
        return sum(n * buf.weight.numel() * buf.weight.element_size() for buf, n in copies.items())

    @property
    def needs_packing(self) -> bool:
        """Whether a merged layer still runs its GEMM without the packed copy `pack_next` would make."""
        return any(linear.merged_packed is None and linear.packed is not None for linear in self._merged)

    def pack_next(self) -> None:
        """Give one merged layer the packed copy of its merged weight (0.5-2 ms on CPU); the engine calls it once
        per step after a merge, so that batches of more than `PLAIN_MAX_ROWS` rows get the faster GEMM back."""
        for linear in self._merged:
            if linear.merged_packed is None and linear.packed is not None:  # weights that pack (CPU float32)
                buffer = self._buffers[linear]
                buffer.packed = prepack(buffer.weight)
                linear.merged_packed = buffer.packed
                return

    def merge(self, weights: Mapping[tuple[int, str], LoraWeights]) -> None:
        """Merge one adapter, (layer, HF projection) -> update, into the model; `ValueError` changes nothing.

        Refused while another adapter is merged, for a DoRA factor of 0 (the correction divides by it) and for
        non-finite merged weights.
        """
        if self._merged:
            raise ValueError("another adapter is merged; unmerge it first")
        per_linear = _per_linear(self._linears, weights)
        for linear, pieces in per_linear.items():
            if linear.lora is None:
                raise ValueError("call attach_lora_slots before merging: other tokens need the correction")
            linear.lora.check_updates(pieces)
            if any(w.g is not None and not bool(w.g.ne(0).all()) for w in pieces.values()):
                raise ValueError("a DoRA factor is 0: the merge could not be undone for other tokens")
        self._buffers = {linear: self._buffers.get(linear) or _Buffer(linear.weight.detach()) for linear in per_linear}
        for linear, pieces in per_linear.items():
            self._buffers[linear].fill(linear.weight.detach(), linear.slices, pieces, self._max_of(linear))
        for linear, pieces in per_linear.items():
            linear.merged = self._buffers[linear].weight
            linear.merged_packed = self._buffers[linear].packed  # still there if the rows did not change
            linear.lora.correction = Correction(linear, pieces)
        self._merged = list(per_linear)
        _synchronize(linear.merged for linear in self._merged)

    def unmerge(self) -> None:
        """Serve the base weights again and drop the corrections; the buffers stay for the next merge."""
        for linear in self._merged:
            linear.merged = None
            linear.merged_packed = None
            linear.lora.correction = None
        self._merged = []

    def _max_of(self, linear: TargetLinear) -> dict[str, float]:
        if linear not in self._base_max:
            w = linear.weight.detach()  # [out, in]
            self._base_max[linear] = {name: float(w[a:b].abs().max()) for name, (a, b) in linear.slices.items()}
        return self._base_max[linear]


def _per_linear(
    linears: Mapping[tuple[int, str], TargetLinear], weights: Mapping[tuple[int, str], LoraWeights]
) -> dict[TargetLinear, dict[str, LoraWeights]]:
    """Group (layer, HF projection) updates by the fused layer that holds the projection."""
    targets = {(i, name): linear for (i, _), linear in linears.items() for name in linear.slices}
    unknown = set(weights) - set(targets)
    if unknown:
        raise ValueError(f"the model has no projections {sorted(unknown)}")
    per_linear: dict[TargetLinear, dict[str, LoraWeights]] = {}
    for (layer, name), update in weights.items():
        per_linear.setdefault(targets[(layer, name)], {})[name] = update
    return per_linear


def _surely_finite(base_max: float, w: LoraWeights, dtype: torch.dtype) -> bool:
    """Whether `g ⊙ (W + b·a)`, summed in float32 and stored as `dtype`, is finite; from bounds alone, no pass over W.

    Every partial sum is at most max|W| + r·max|b|·max|a| in magnitude; half the largest value leaves room for
    rounding.
    """
    update, g = w.max_abs
    return (base_max + update) * g <= min(torch.finfo(dtype).max, torch.finfo(torch.float32).max) / 2


def _merge_rows(rows: torch.Tensor, w: LoraWeights, out: torch.Tensor) -> None:
    """`out = g ⊙ (rows + b·a)`, summed in float32; rows, out: [out_slice, in], b: [out_slice, r], a: [r, in]."""
    opts = {"device": rows.device, "dtype": torch.float32}
    a, b = w.a.to(**opts), w.b.to(**opts)
    if out.dtype == torch.float32:  # sum straight into the buffer
        torch.addmm(rows, b, a, out=out)
        if w.g is not None:
            out.mul_(w.g.to(**opts)[:, None])
        return
    merged = torch.addmm(rows.float(), b, a)
    if w.g is not None:
        merged.mul_(w.g.to(**opts)[:, None])
    out.copy_(merged)


def _synchronize(weights) -> None:
    """Wait for the device, so that whoever times the merge times the work rather than its launch."""
    devices = {w.device for w in weights if w.device.type == "cuda"}
    for device in devices:
        torch.cuda.synchronize(device)
