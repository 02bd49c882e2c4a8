"""Small building blocks of the Llama-family forward: RMSNorm, rotary embedding, SwiGLU.

Each runs as torch ops, or as one fused kernel where the model was built with `fused` (`server.model.kernels`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm computed in float32, as Llama does, optionally after the residual add."""

    def __init__(self, weight: torch.Tensor, eps: float, fused: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [hidden]
        self.eps = eps
        self.fused = fused

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """norm(x); with `residual`, first `residual += x` in place (rounded to the dtype) and norm(residual)."""
        # x, residual: [T, hidden]
        if self.fused:
            if residual is None:
                return torch.ops.loraplex.rms_norm(x, self.weight, self.eps)
            return torch.ops.loraplex.add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = residual.add_(x)
        # F.rms_norm without a weight is bit for bit `x * rsqrt(mean(x²) + eps)` in float32, in one kernel
        normed = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)
        return self.weight * normed.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary position embedding with a precomputed cos/sin table."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, device: torch.device | None = None) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=device), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] -> cos, sin: [T, 1, head_dim], shared by every layer of a step
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, head_dim]; cos, sin: [T, 1, head_dim]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def silu_and_mul(gate_up: torch.Tensor, fused: bool = False) -> torch.Tensor:
    # gate_up: [T, 2 * intermediate] -> [T, intermediate]
    if fused:
        return torch.ops.loraplex.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
