"""Frozen linear layers that adapters can target, possibly several HF projections fused into one GEMM."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from server.model.lora import LoraBatch, LoraSlots


class TargetLinear(nn.Module):
    """`y = x·Wᵀ` for the whole packed batch, plus each token's adapter delta on the named output slices.

    `slices` maps each fused Hugging Face projection (e.g. `q_proj`) to its output columns `[start, end)`;
    adapters target those names. `lora` holds the per-slot adapter weights once adapters are enabled.
    """

    def __init__(self, weight: torch.Tensor, slices: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in]
        self.slices = slices
        self.lora: LoraSlots | None = None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor, lora_batch: LoraBatch | None = None) -> torch.Tensor:
        # x: [T, in] -> y: [T, out]
        y = F.linear(x, self.weight)
        if lora_batch is not None and self.lora is not None:
            y = self.lora.apply(x, y, lora_batch)
        return y
