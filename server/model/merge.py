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
the rows it does not overwrite. On CPU the merged layers first run the plain GEMM; `pack_next`, one layer per
engine step, then gives them oneDNN's packed copy (the faster GEMM in bfloat16, and in float32 above
`PLAIN_MAX_ROWS` rows), kept as long as the buffer's rows do not change. Buffers of layers the latest merge does
not touch are freed, so the extra memory is at most two copies (plain and packed) of the layers one adapter targets
(`WeightMerger.num_bytes`).

Tokens that do not use X must not see it. Each layer X touches gets X's updates as its slots' correction, applied by
`LoraSlots.apply` before the tokens' own adapter deltas: `x·Wᵀ = (x·W'ᵀ) / g_X − x·(s·B·A)ᵀ` on X's projections
(`LoraWeights.remove`; g_X = 1 for LoRA). The merger is given the model's `ProjectionMap`, not the model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from server.model.linear import TargetLinear, prepack
from server.model.lora_weights import LoraWeights
from server.model.projections import ProjectionMap


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
        `base_max` holds max |W| of each projection's rows, for `LoraWeights.merge_is_surely_finite`.
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
            update.merge_into(base[start:end], rows)
            if not update.merge_is_surely_finite(base_max[name], rows.dtype) and not bool(torch.isfinite(rows).all()):
                raise ValueError(f"merging {name} gives non-finite weights")
            self.held[name] = update


class WeightMerger:
    """Merges one adapter at a time into a model's target layers and takes it out again, bit-exactly."""

    def __init__(self, projections: ProjectionMap) -> None:
        self._projections = projections
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
        per step after a merge, so that the merged layers get the faster packed GEMM back."""
        for linear in self._merged:
            if linear.merged_packed is None and linear.packed is not None:  # weights that pack (CPU float32, bfloat16)
                buffer = self._buffers[linear]
                buffer.packed = prepack(buffer.weight)
                linear.serve_merged(buffer.weight, buffer.packed)
                return

    def merge(self, weights: Mapping[tuple[int, str], LoraWeights]) -> None:
        """Merge one adapter, (layer, HF projection) -> update, into the model; `ValueError` changes nothing.

        Refused while another adapter is merged, for a DoRA factor of 0 (the correction divides by it) and for
        non-finite merged weights.
        """
        if self._merged:
            raise ValueError("another adapter is merged; unmerge it first")
        per_linear = self._projections.group(weights)
        for linear, pieces in per_linear.items():
            if linear.lora is None:
                raise ValueError("enable adapters before merging: other tokens need the correction")
            linear.lora.check_updates(pieces)
            if not all(w.is_invertible for w in pieces.values()):
                raise ValueError("a DoRA factor is 0: the merge could not be undone for other tokens")
        self._buffers = {linear: self._buffers.get(linear) or _Buffer(linear.weight.detach()) for linear in per_linear}
        for linear, pieces in per_linear.items():
            self._buffers[linear].fill(linear.weight.detach(), linear.slices, pieces, self._max_of(linear))
        for linear, pieces in per_linear.items():
            buffer = self._buffers[linear]  # its packed copy is still there if the rows did not change
            linear.serve_merged(buffer.weight, buffer.packed)
            linear.lora.set_correction(pieces)
        self._merged = list(per_linear)
        _synchronize(linear.merged for linear in self._merged)

    def unmerge(self) -> None:
        """Serve the base weights again and drop the corrections; the buffers stay for the next merge."""
        for linear in self._merged:
            linear.serve_merged(None)
            linear.lora.set_correction(None)
        self._merged = []

    def _max_of(self, linear: TargetLinear) -> dict[str, float]:
        if linear not in self._base_max:
            w = linear.weight.detach()  # [out, in]
            self._base_max[linear] = {name: float(w[a:b].abs().max()) for name, (a, b) in linear.slices.items()}
        return self._base_max[linear]


def _synchronize(weights) -> None:
    """Wait for the device, so that whoever times the merge times the work rather than its launch."""
    devices = {w.device for w in weights if w.device.type == "cuda"}
    for device in devices:
        torch.cuda.synchronize(device)
