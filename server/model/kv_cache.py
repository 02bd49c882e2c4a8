"""Paged KV cache storage: fixed pools of blocks per layer, addressed by flat slot (block * block_size + offset)."""

from __future__ import annotations

import torch

from server.model.architecture import ModelSpec


class KVCache:
    """K and V pools for every layer, `[num_blocks * block_size, kv_heads, head_dim]` each."""

    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (spec.num_layers, num_blocks * block_size, spec.num_kv_heads, spec.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def blocks_for_budget(spec: ModelSpec, budget_bytes: int, block_size: int, dtype: torch.dtype) -> int:
        return budget_bytes // (spec.kv_bytes_per_token(dtype) * block_size)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[index], self.v[index]
