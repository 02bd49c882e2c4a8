"""Frozen linear layers that adapters can target, possibly several HF projections fused into one GEMM."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from server.model.lora import LoraBatch, LoraSlots


def prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of a CPU float32 weight `[out, in]`, or None where it does not apply.

    On this CPU a decode-sized GEMM (M ≈ 8-64 rows) runs 1.5-2x faster from the blocked layout than
    `F.linear` on the plain weight, whatever M is; prefill-sized GEMMs run the same (bench/bench_engine.py).
    """
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    # x: [T, in], weight: [out, in] -> [T, out]
    if packed is None:
        return F.linear(x, weight)
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


class TargetLinear(nn.Module):
    """`y = x·Wᵀ` for the whole packed batch, plus each token's adapter delta on the named output slices.

    `slices` maps each fused Hugging Face projection (e.g. `q_proj`) to its output columns `[start, end)`;
    adapters target those names. `lora` holds the per-slot adapter weights once adapters are enabled.
    Whoever replaces `weight` (merging an adapter, `server.model.merge`) calls `repack()` afterwards.
    """

    def __init__(self, weight: torch.Tensor, slices: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in]
        self.slices = slices
        self.lora: LoraSlots | None = None
        self.packed = prepack(self.weight.data)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def repack(self) -> None:
        self.packed = prepack(self.weight.data)

    def forward(self, x: torch.Tensor, lora_batch: LoraBatch | None = None) -> torch.Tensor:
        # x: [T, in] -> y: [T, out]
        y = linear(x, self.weight, self.packed)
        if lora_batch is not None and self.lora is not None:
            y = self.lora.apply(x, y, lora_batch)
        return y
