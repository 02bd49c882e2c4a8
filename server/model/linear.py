"""Frozen linear layers that adapters can target, possibly several HF projections fused into one GEMM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.model.gemm_shapes import padded_rows
from server.model.lora import LoraSlots
from server.model.routing import LoraBatch

# Up to this many rows the plain weight's GEMM beats oneDNN's packed copy, by weight dtype (see `prepack`).
PLAIN_MAX_ROWS = {torch.float32: 3, torch.bfloat16: 0}
PACKED_DTYPES = tuple(PLAIN_MAX_ROWS)


def prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of a CPU float32 or bfloat16 weight `[out, in]`, or None where it does not apply.

    float32: a decode-sized GEMM of 4-64 rows runs 1.1-2x faster from the blocked layout than `F.linear` on the
    plain weight (most for gate/up) and prefill-sized GEMMs run the same, but up to 3 rows the plain weight is
    faster: a whole SmolLM2-135M decode step of 1-3 sequences took 0.85-0.87x the time on plain weights, one of 4 or
    8 sequences 1.24-1.35x (2 threads, bench/bench_linear.py). bfloat16 (where oneDNN computes it natively): the
    packed copy is faster at every row count, 1.2-1.6x for each of the default model's projections and its LM head
    at 1, 4 and 32 rows, with bit-identical results. `linear` picks accordingly.
    """
    if weight.device.type != "cpu" or weight.dtype not in PACKED_DTYPES or not torch.backends.mkldnn.is_available():
        return None
    if weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    # x: [T, in], weight: [out, in] -> [T, out]
    rows = x.shape[0]
    if packed is None or rows <= PLAIN_MAX_ROWS[weight.dtype]:
        return F.linear(x, weight)
    padded = padded_rows(rows)
    if padded != rows:
        x = F.pad(x, (0, 0, 0, padded - rows))  # zero rows, so oneDNN meets few shapes (`server.model.gemm_shapes`)
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")[:rows]


class TargetLinear(nn.Module):
    """`y = x·Wᵀ` for the whole packed batch, plus each token's adapter delta on the named output slices.

    `slices` maps each fused Hugging Face projection (e.g. `q_proj`) to its output columns `[start, end)`;
    adapters target those names. A `bias` is added last, after the adapter deltas (DoRA scales `x·Wᵀ + Δ`, not b).
    `lora` holds the per-slot adapter weights once `enable_adapters` made them.
    `weight` is the frozen base weight and is never replaced. While an adapter is merged (`server.model.merge`
    calls `serve_merged`), `merged` holds the weight with the adapter in it and the GEMM runs on that instead;
    `merged_packed`, its oneDNN copy, arrives some steps after the merge (packing costs more than merging), and
    until then every batch size runs the plain GEMM on it.
    """

    def __init__(
        self, weight: torch.Tensor, slices: dict[str, tuple[int, int]], bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in]
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None  # [out]
        self.slices = slices
        self.lora: LoraSlots | None = None
        self.packed = prepack(self.weight.data)
        self.merged: torch.Tensor | None = None  # [out, in], the weight with the merged adapter in it, if any
        self.merged_packed: torch.Tensor | None = None  # prepack(merged), once made

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def enable_adapters(self, max_loras: int, fused: bool = False) -> None:
        """Give this layer empty slot storage for `max_loras` adapters (`fused`: served by the fused bf16 kernels)."""
        self.lora = LoraSlots(self.slices, self.in_features, max_loras, self.weight.dtype, self.weight.device, fused)

    def serve_merged(self, merged: torch.Tensor | None, packed: torch.Tensor | None = None) -> None:
        """Run the GEMM on `merged` [out, in] (and on `packed`, its copy, once made); None: on `weight` again."""
        self.merged, self.merged_packed = merged, packed

    def forward(self, x: torch.Tensor, lora_batch: LoraBatch | None = None) -> torch.Tensor:
        # x: [T, in] -> y: [T, out]
        weight, packed = (self.weight, self.packed) if self.merged is None else (self.merged, self.merged_packed)
        y = linear(x, weight, packed)
        if lora_batch is not None and self.lora is not None:
            y = self.lora.apply(x, y, lora_batch)
        return y if self.bias is None else y + self.bias
