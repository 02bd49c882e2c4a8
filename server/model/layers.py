"""Small building blocks of the decoder forward: RMSNorm, rotary rotation, the gated MLP activation.

Each runs as torch ops, or as one fused kernel where the model was built with `fused` (`server.model.kernels`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm computed in float32, optionally after the residual add.

    Llama style (`offset` 0): `w · norm(x)` with the product in the model's dtype. Gemma style (`offset` 1):
    `norm(x) · (1 + w)` with the product in float32, rounded once, as transformers computes each.
    """

    def __init__(self, weight: torch.Tensor, eps: float, fused: bool = False, offset: float = 0.0) -> None:
        super().__init__()
        self.offset = offset
        # Gemma keeps (1 + w) in float32: in bf16, 1 + 0.003 would round to 1
        scale = weight.float() + offset if offset else weight
        self.weight = nn.Parameter(scale, requires_grad=False)  # [hidden]
        self.eps = eps
        self.fused = fused and not offset

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """norm(x); with `residual`, first `residual += x` in place (rounded to the dtype) and norm(residual)."""
        # x, residual: [T, hidden] (or [T, heads, head_dim] for q/k norms)
        if self.fused:
            if residual is None:
                return torch.ops.loraplex.rms_norm(x, self.weight, self.eps)
            return torch.ops.loraplex.add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = residual.add_(x)
        # F.rms_norm without a weight is bit for bit `x * rsqrt(mean(x²) + eps)` in float32, in one kernel
        normed = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)
        if self.offset:
            return (normed * self.weight).to(x.dtype)
        return self.weight * normed.to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, head_dim]; cos, sin: [T, 1, rotary_dim]; dims past rotary_dim pass through (partial rotary)
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)
    half = rotary_dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def gated_act(gate_up: torch.Tensor, activation: str = "silu", fused: bool = False) -> torch.Tensor:
    # gate_up: [T, 2 * intermediate] -> act(gate) * up: [T, intermediate]
    if fused:
        return torch.ops.loraplex.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    return F.silu(gate) * up
