"""Paged attention, reading the block cache in place, against plain causal attention over each sequence's keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.model.architecture import FAMILIES, ModelSpec
from server.model.attention import AttentionPlan, paged_attention, write_kv
from server.model.batch import ForwardBatch
from server.model.kernels import load_fused_kernels
from server.model.kv_cache import KVCache

BLOCK = 4
SPEC = ModelSpec(
    model_type="llama", family=FAMILIES["llama"], vocab_size=10, hidden_size=48, intermediate_size=8, num_layers=1,
    num_heads=6, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, max_position_embeddings=64,
    tie_word_embeddings=True, eos_token_ids=(),
)  # fmt: skip


def _batch(contexts: list[int], query_lens: list[int], tables: list[list[int]]) -> ForwardBatch:
    """Sequence i computes its last `query_lens[i]` of `contexts[i]` positions; blocks as in `tables[i]`."""
    kv_slots, starts = [], [0]
    for ctx, q_len, table in zip(contexts, query_lens, tables, strict=True):
        kv_slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(ctx - q_len, ctx)]
        starts.append(starts[-1] + q_len)
    width = max(len(t) for t in tables)
    return ForwardBatch(
        input_ids=torch.zeros(starts[-1], dtype=torch.int64),
        positions=torch.zeros(starts[-1], dtype=torch.int64),
        kv_slots=torch.tensor(kv_slots),
        query_start=torch.tensor(starts),
        context_lens=torch.tensor(contexts),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        logits_indices=torch.zeros(0, dtype=torch.int64),
    )


def _split(keys, values, cached_lens) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(cached K, V) and (this step's K, V) of every sequence, packed."""
    old = tuple(torch.cat([t[:n] for t, n in zip(ts, cached_lens, strict=True)]) for ts in (keys, values))
    new = tuple(torch.cat([t[n:] for t, n in zip(ts, cached_lens, strict=True)]) for ts in (keys, values))
    return old, new


# decode at 9 and 16 keys, a fresh prefill of 5, a chunk of 3 after 8 cached positions, a 1-token prompt;
# then a decode-only step. Blocks are interleaved between sequences, as the block manager hands them out.
MIXED = ([9, 5, 11, 16, 1], [1, 5, 3, 1, 1], [[7, 2, 11], [4, 9], [0, 5, 12], [3, 8, 1, 10], [6]], [0, 9])
DECODE_ONLY = ([9, 16, 2], [1, 1, 1], [[7, 2, 11], [3, 8, 1, 10], [6]], [0, 1, 2])


@pytest.mark.parametrize(
    ("dtype", "tol", "fused"),
    [(torch.float32, 1e-5, False), (torch.bfloat16, 2e-2, False), (torch.bfloat16, 2e-2, True)],
    ids=["float32", "bfloat16", "bfloat16-fused"],
)
@pytest.mark.parametrize("case", [MIXED, DECODE_ONLY], ids=["mixed", "decode-only"])
def test_paged_attention_matches_plain_attention(dtype, tol, fused, case):
    if fused:
        assert load_fused_kernels() is None
    torch.manual_seed(0)
    contexts, query_lens, tables, decode_tokens = case
    batch = _batch(contexts, query_lens, tables)
    cache = KVCache(SPEC, num_blocks=13, block_size=BLOCK, dtype=dtype, device=torch.device("cpu"))
    k_cache, v_cache = cache.layer(0)
    k_cache.fill_(float("nan"))  # what no step writes must never reach an output (padding, other sequences)
    v_cache.fill_(float("nan"))
    keys = [torch.randn(c, SPEC.num_kv_heads, SPEC.head_dim, dtype=dtype) for c in contexts]  # every position
    values = [torch.randn(c, SPEC.num_kv_heads, SPEC.head_dim, dtype=dtype) for c in contexts]
    cached_lens = [c - q for c, q in zip(contexts, query_lens, strict=True)]
    cached = _batch(cached_lens, cached_lens, tables)  # the earlier steps wrote these positions
    write_kv(k_cache, v_cache, AttentionPlan.build(cached, BLOCK, SPEC), *_split(keys, values, cached_lens)[0])
    plan = AttentionPlan.build(batch, BLOCK, SPEC, fused)
    k, v = _split(keys, values, cached_lens)[1]
    write_kv(k_cache, v_cache, plan, k, v)
    q = torch.randn(k.shape[0], SPEC.num_heads, SPEC.head_dim, dtype=dtype)
    got = paged_attention(q, k, v, k_cache, v_cache, plan).float()
    starts = batch.query_start.tolist()
    for i, ctx in enumerate(contexts):
        q_i = q[starts[i] : starts[i + 1]].transpose(0, 1).float()  # [heads, q_len, head_dim], reference in float32
        mask = torch.ones(query_lens[i], ctx, dtype=torch.bool).tril(ctx - query_lens[i])
        want = F.scaled_dot_product_attention(
            q_i, keys[i].transpose(0, 1).float(), values[i].transpose(0, 1).float(), attn_mask=mask, enable_gqa=True
        ).transpose(0, 1)
        torch.testing.assert_close(got[starts[i] : starts[i + 1]].view_as(want), want, atol=tol, rtol=tol)
    assert plan.decode is not None and plan.decode.tokens.tolist() == decode_tokens


def test_write_kv_puts_each_token_at_its_block_and_offset():
    batch = _batch([6], [6], [[2, 0]])
    cache = KVCache(SPEC, num_blocks=3, block_size=BLOCK, dtype=torch.float32, device=torch.device("cpu"))
    k_cache, v_cache = cache.layer(0)
    k = torch.randn(6, SPEC.num_kv_heads, SPEC.head_dim)
    write_kv(k_cache, v_cache, AttentionPlan.build(batch, BLOCK, SPEC), k, -k)
    torch.testing.assert_close(k_cache[2, :, :, 3], k[3])  # keys: [blocks, kv_heads, head_dim, block_size]
    torch.testing.assert_close(v_cache[0, :, 1], -k[5])  # values: [blocks, kv_heads, block_size, head_dim]
    assert k_cache[1].abs().sum() == 0
