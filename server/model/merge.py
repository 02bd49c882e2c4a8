"""Merge one adapter into the base weights and take it out again, exactly.

Merging X gives every layer X targets a new weight `W' = W + s·B·A` on X's projections (DoRA: `g ⊙ (W + s·B·A)`),
computed in float32 and re-packed for oneDNN. The original tensors, the plain weight and its packed copy, are set
aside untouched and unmerging puts them back: after any number of cycles the base weights are the very same tensors,
bit for bit, unmerging costs no arithmetic, and views taken of the originals (`ModelInfo.base_weight`, which DoRA
factors are computed from) keep reading pristine values while X is merged. The price is memory: while X is merged,
each layer it touches is held twice (`MergedAdapter.num_bytes` says how much).

Tokens that do not use X must not see it. Each layer X touches gets a `Correction`, applied by `LoraSlots.apply`
before the tokens' own adapter deltas: `x·Wᵀ = (x·W'ᵀ) / g_X − x·(s·B·A)ᵀ` on X's projections (g_X = 1 for LoRA).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from server.model.linear import TargetLinear
from server.model.llama import LlamaModel
from server.model.lora import LoraWeights


@dataclass(frozen=True)
class _Piece:
    """The merged update of one projection, laid out for the correction."""

    start: int  # the projection's output columns [start, end) in the fused layer
    end: int
    a_t: torch.Tensor  # [in, r]
    b_t: torch.Tensor  # [r, out_slice], scale folded in
    g: torch.Tensor | None  # [out_slice], DoRA factor; None for LoRA


class Correction:
    """Undo a merged adapter for the tokens that do not use it, on the projections it targets."""

    def __init__(self, linear: TargetLinear, pieces: Mapping[str, LoraWeights]) -> None:
        opts = {"device": linear.weight.device, "dtype": linear.weight.dtype}  # updates may live in host memory
        self._pieces = [
            _Piece(*linear.slices[name], w.a.T.to(**opts).contiguous(), w.b.T.to(**opts).contiguous(),
                   None if w.g is None else w.g.to(**opts))
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


@dataclass(frozen=True)
class _Original:
    weight: nn.Parameter
    packed: torch.Tensor | None


@dataclass(frozen=True)
class MergedAdapter:
    """One merge: the original weights of every layer it replaced, which `unmerge_adapter` puts back."""

    originals: Mapping[TargetLinear, _Original]
    num_bytes: int  # memory the merged weights take, packed copies included


def merge_adapter(model: LlamaModel, weights: Mapping[tuple[int, str], LoraWeights]) -> MergedAdapter:
    """Merge one adapter, (layer, HF projection) -> update, into the model; `ValueError` changes nothing.

    Refused while another adapter is merged, for a DoRA factor of 0 (the correction divides by it) and for
    non-finite merged weights.
    """
    linears = model.target_linears()  # (layer, fused module name) -> layer
    if any(linear.lora is not None and linear.lora.correction is not None for linear in linears.values()):
        raise ValueError("another adapter is merged; unmerge it first")
    per_linear = _per_linear(linears, weights)
    for linear, pieces in per_linear.items():
        if linear.lora is None:
            raise ValueError("call attach_lora_slots before merging: other tokens need the merged adapter's correction")
        linear.lora.check_updates(pieces)
        if any(w.g is not None and not bool(w.g.ne(0).all()) for w in pieces.values()):
            raise ValueError("a DoRA factor is 0: the merge could not be undone for other tokens")
    merged = {linear: _merged_weight(linear, pieces) for linear, pieces in per_linear.items()}
    originals = {}
    for linear, weight in merged.items():
        originals[linear] = _Original(linear.weight, linear.packed)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        linear.repack()
        linear.lora.correction = Correction(linear, per_linear[linear])
    _synchronize(merged.values())
    copies = {linear: 1 if linear.packed is None else 2 for linear in merged}  # the packed copy is as large
    return MergedAdapter(originals, sum(copies[lin] * w.numel() * w.element_size() for lin, w in merged.items()))


def unmerge_adapter(merged: MergedAdapter) -> None:
    """Put back the original weights of every layer `merged` replaced and drop its corrections."""
    for linear, original in merged.originals.items():
        linear.weight = original.weight
        linear.packed = original.packed
        linear.lora.correction = None


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


def _merged_weight(linear: TargetLinear, pieces: Mapping[str, LoraWeights]) -> torch.Tensor:
    """A new `[out, in]` weight: the original, with `g ⊙ (W + s·B·A)` on each updated slice; one pass over W."""
    original = linear.weight.detach()  # [out, in]
    weight = torch.empty_like(original)
    done = 0
    for name in sorted(pieces, key=lambda name: linear.slices[name]):
        start, end = linear.slices[name]
        weight[done:start].copy_(original[done:start])
        _merge_rows(original[start:end], pieces[name], weight[start:end])
        if not bool(weight[start:end].sum(dtype=torch.float32).isfinite()):  # any non-finite value shows in the sum
            raise ValueError(f"merging {name} gives non-finite weights")
        done = end
    weight[done:].copy_(original[done:])
    return weight


def _merge_rows(rows: torch.Tensor, w: LoraWeights, out: torch.Tensor) -> None:
    """`out = g ⊙ (rows + b·a)`, summed in float32; rows, out: [out_slice, in], b: [out_slice, r], a: [r, in]."""
    opts = {"device": rows.device, "dtype": torch.float32}
    a, b = w.a.to(**opts), w.b.to(**opts)
    in_place = out.dtype == torch.float32  # sum straight into the new weight
    merged = torch.addmm(rows, b, a, out=out) if in_place else torch.addmm(rows.float(), b, a)
    if w.g is not None:
        merged.mul_(w.g.to(**opts)[:, None])
    out.copy_(merged)


def _synchronize(weights) -> None:
    """Wait for the device, so that whoever times the merge times the work rather than its launch."""
    devices = {w.device for w in weights if w.device.type == "cuda"}
    for device in devices:
        torch.cuda.synchronize(device)
