"""Attention over the paged KV cache, planned once per step and reused by every layer.

Decode rows (one query token each) are gathered into one padded batch and served by a single
`scaled_dot_product_attention` call; each prefill (or prefill chunk) runs its own causal call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.model.batch import ForwardBatch


@dataclass
class PrefillSpan:
    """One sequence with several query tokens this step."""

    start: int  # first token of the sequence in the packed batch
    end: int
    context_len: int  # keys after this step (cached + new)
    slots: torch.Tensor | None  # [context_len] flat KV slots to read; None = nothing cached, use fresh K/V


@dataclass
class AttentionPlan:
    """Index tensors derived from the batch once per step, shared by all layers."""

    decode_tokens: torch.Tensor | None  # [D] packed index of each decode token
    decode_slots: torch.Tensor | None  # [D * L] flat KV slots, padding points at the row's first slot
    decode_mask: torch.Tensor | None  # [D, 1, 1, L] True where the key is inside the context
    decode_len: int  # L, the longest decode context
    prefills: list[PrefillSpan]

    @classmethod
    def build(cls, batch: ForwardBatch, block_size: int) -> AttentionPlan:
        starts = batch.query_start.tolist()
        ctx = batch.context_lens.tolist()
        device = batch.input_ids.device
        decode_rows, prefills = [], []
        for i, c in enumerate(ctx):
            q_len = starts[i + 1] - starts[i]
            if q_len == 1 and c > 1:
                decode_rows.append(i)
            else:
                slots = None if q_len == c else _slots(batch.block_tables[i], c, block_size)
                prefills.append(PrefillSpan(starts[i], starts[i + 1], c, slots))
        if not decode_rows:
            return cls(None, None, None, 0, prefills)
        rows = torch.tensor(decode_rows, device=device)
        lens = batch.context_lens.to(device)[rows]  # [D]
        max_len = max(ctx[i] for i in decode_rows)
        positions = torch.arange(max_len, device=device)  # [L]
        tables = batch.block_tables.to(device)[rows]  # [D, max_blocks]
        slots = tables[:, positions // block_size] * block_size + positions % block_size  # [D, L]
        mask = positions.unsqueeze(0) < lens.unsqueeze(1)  # [D, L]
        # Padding reads the row's own first slot, never another sequence's: masked keys still enter the matmuls,
        # and a NaN there (a request whose adapter overflowed) would poison every row that reads it.
        slots = torch.where(mask, slots, slots[:, :1])
        tokens = batch.query_start[:-1].to(device)[rows]
        return cls(tokens, slots.reshape(-1), mask[:, None, None, :], max_len, prefills)


def _slots(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    positions = torch.arange(length, device=block_table.device)
    return block_table[positions // block_size] * block_size + positions % block_size


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan
) -> torch.Tensor:
    """Attend each token to its sequence's cached and fresh keys. Fresh K/V must already be in the cache.

    q: [T, heads, head_dim]; k, v: [T, kv_heads, head_dim] (this step's); caches: [slots, kv_heads, head_dim].
    Returns [T, heads * head_dim].
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv = k.shape[1]
    out = torch.empty_like(q)
    for span in plan.prefills:
        q_i = q[span.start : span.end].transpose(0, 1)  # [heads, q_len, head_dim]
        if span.slots is None:
            k_i, v_i = k[span.start : span.end], v[span.start : span.end]
            o = F.scaled_dot_product_attention(
                q_i, k_i.transpose(0, 1), v_i.transpose(0, 1), is_causal=True, enable_gqa=True
            )
        else:
            k_i = k_cache.index_select(0, span.slots).transpose(0, 1)  # [kv_heads, ctx, head_dim]
            v_i = v_cache.index_select(0, span.slots).transpose(0, 1)
            o = F.scaled_dot_product_attention(q_i, k_i, v_i, attn_mask=_chunk_mask(span, q.device), enable_gqa=True)
        out[span.start : span.end] = o.transpose(0, 1)
    if plan.decode_tokens is not None:
        d, length = plan.decode_tokens.shape[0], plan.decode_len
        group = num_heads // num_kv
        # Query heads of one KV head stand in for query positions: one SDPA call with no KV repeat.
        q_d = q.index_select(0, plan.decode_tokens).view(d, num_kv, group, head_dim)
        k_d = k_cache.index_select(0, plan.decode_slots).view(d, length, num_kv, head_dim).transpose(1, 2)
        v_d = v_cache.index_select(0, plan.decode_slots).view(d, length, num_kv, head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q_d, k_d, v_d, attn_mask=plan.decode_mask)  # [D, kv, group, hd]
        out[plan.decode_tokens] = o.reshape(d, num_heads, head_dim)
    return out.view(num_tokens, num_heads * head_dim)


def _chunk_mask(span: PrefillSpan, device: torch.device) -> torch.Tensor:
    # Query j of the chunk sits at absolute position context_len - q_len + j and sees keys up to it.
    q_len = span.end - span.start
    q_pos = torch.arange(span.context_len - q_len, span.context_len, device=device)
    return q_pos.unsqueeze(1) >= torch.arange(span.context_len, device=device).unsqueeze(0)  # [q_len, ctx]
