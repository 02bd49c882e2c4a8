"""The packed batch a forward step consumes: all tokens of all sequences, no padding between them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """Token-level and sequence-level tensors for one step; S sequences, T tokens in all.

    Sequence i owns tokens `query_start[i]:query_start[i+1]`; they are its last `query_len` positions
    out of `context_lens[i]` (cached tokens plus this step's). Each token's K/V are written to flat
    cache slot `kv_slots[t]` = block * block_size + offset before attention reads the cache.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    kv_slots: torch.Tensor  # [T] int64, flat KV-cache slot each token writes
    query_start: torch.Tensor  # [S + 1] int64 (CPU), cumulative query lengths
    context_lens: torch.Tensor  # [S] int64 (CPU), KV length of each sequence after this step
    block_tables: torch.Tensor  # [S, max_blocks] int64, block ids, padded with 0
    logits_indices: torch.Tensor  # [L] int64, tokens whose logits are sampled (L <= S)
    adapter_slots: torch.Tensor | None = None  # [T] int64 adapter slot per token or a marker (server.model.routing)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @property
    def is_decode_only(self) -> bool:
        return self.num_tokens == self.num_seqs
