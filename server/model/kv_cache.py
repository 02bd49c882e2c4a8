"""Paged KV cache storage: fixed pools of blocks per layer, laid out so attention reads them in place.

A token's flat slot is `block * block_size + offset`. Within a block, keys are stored transposed (one row per
head feature, `block_size` positions wide) and values one row per position, so decode attention reduces straight
out of the pools with `embedding_bag` (`server.model.attention`) instead of gathering each sequence's K/V first.
"""

from __future__ import annotations

import torch

from server.model.architecture import ModelSpec


class KVCache:
    """K and V pools for every layer.

    k: `[layers, num_blocks, kv_heads, head_dim, block_size]`;
    v: `[layers, num_blocks, kv_heads, block_size, head_dim]`.
    """

    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        blocks = (spec.num_layers, num_blocks, spec.num_kv_heads)
        self.k = torch.zeros(*blocks, spec.head_dim, block_size, dtype=dtype, device=device)
        self.v = torch.zeros(*blocks, block_size, spec.head_dim, dtype=dtype, device=device)

    @staticmethod
    def blocks_for_budget(spec: ModelSpec, budget_bytes: int, block_size: int, dtype: torch.dtype) -> int:
        return budget_bytes // (spec.kv_bytes_per_token(dtype) * block_size)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[index], self.v[index]
