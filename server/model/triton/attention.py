"""Paged decode attention in Triton, reading `server.model.kv_cache`'s pools in place.

One program per (decode row, KV head) walks the row's block table with an online softmax in float32 for every query
head of that KV head's group (GQA), so each block of K and V is read once, not once per query head: keys come as
one block's [head_dim, block_size] tile (the cache stores them transposed), values as [block_size, head_dim]. A
sliding window starts the walk at the window's first block and masks the positions before it; Gemma 2's soft-cap
bends the scores before the mask, as the torch path does (`server.model.attention._decode_attention`, the
reference). Positions past a row's length are never loaded, so stale values in a reused block cannot reach the sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NO_WINDOW = 2**30  # the window of a layer without one: longer than any context


@triton.jit
def _decode_kernel(
    q, k_cache, v_cache, out, tokens, tables, lens, scale, softcap, window, group, head_dim, block_size,
    sq_t, sq_h, sk_b, sk_h, sk_d, sk_p, sv_b, sv_h, sv_p, sv_d, so_r, so_h, st_r,
    GROUP: tl.constexpr, BLOCK_P: tl.constexpr, HEAD: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    row, kv_head = tl.program_id(0), tl.program_id(1)
    token = tl.load(tokens + row).to(tl.int64)
    length = tl.load(lens + row)
    offs_g = tl.arange(0, GROUP)
    heads = kv_head * group + offs_g  # the query heads reading this KV head
    g_mask = offs_g < group
    offs_d = tl.arange(0, HEAD)
    d_mask = offs_d < head_dim
    q_ptrs = q + token * sq_t + heads[:, None] * sq_h + offs_d[None, :]
    query = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32) * scale  # [G, HEAD]
    first = tl.maximum(length - window, 0)  # the first key the window sees; `window` is huge without one
    offs_p = tl.arange(0, BLOCK_P)
    m_i = tl.full((GROUP,), -float("inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP,), dtype=tl.float32)
    acc = tl.zeros((GROUP, HEAD), dtype=tl.float32)
    kv_head = kv_head.to(tl.int64)
    for blk in range(first // block_size, tl.cdiv(length, block_size)):
        block = tl.load(tables + row * st_r + blk).to(tl.int64)
        pos = blk * block_size + offs_p
        valid = (offs_p < block_size) & (pos < length) & (pos >= first)
        k_ptrs = k_cache + block * sk_b + kv_head * sk_h + offs_d[:, None] * sk_d + offs_p[None, :] * sk_p
        keys = tl.load(k_ptrs, mask=d_mask[:, None] & valid[None, :], other=0.0).to(tl.float32)  # [HEAD, BLOCK_P]
        scores = tl.sum(query[:, :, None] * keys[None, :, :], axis=1)  # [G, BLOCK_P]
        if SOFTCAP:
            scores = softcap * (2.0 * tl.sigmoid(2.0 * scores / softcap) - 1.0)  # softcap · tanh(scores / softcap)
        scores = tl.where(valid[None, :], scores, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        probs = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(probs, axis=1)
        v_ptrs = v_cache + block * sv_b + kv_head * sv_h + offs_p[:, None] * sv_p + offs_d[None, :] * sv_d
        values = tl.load(v_ptrs, mask=valid[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_P, HEAD]
        acc = acc * alpha[:, None] + tl.sum(probs[:, :, None] * values[None, :, :], axis=1)
        m_i = m_new
    o_ptrs = out + row * so_r + heads[:, None] * so_h + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_i[:, None]).to(out.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tokens: torch.Tensor, tables: torch.Tensor,
    lens: torch.Tensor, scale: float, window: int | None = None, softcap: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """softmax(q·Kᵀ·scale)·V for each decode row, straight out of one layer's pools. Returns [D, heads, head_dim].

    q: [T, heads, head_dim]; k_cache: [blocks, kv_heads, head_dim, block_size]; v_cache: [blocks, kv_heads,
    block_size, head_dim]; tokens: [D] packed index of each row's query; tables: [D, n] its blocks; lens: [D] keys.
    """
    rows, (_, num_heads, head_dim) = tokens.shape[0], q.shape
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[3]
    out = q.new_empty(rows, num_heads, head_dim)
    if rows == 0:
        return out
    _decode_kernel[(rows, kv_heads)](
        q, k_cache, v_cache, out, tokens, tables, lens, scale, softcap or 1.0, window or NO_WINDOW,
        num_heads // kv_heads, head_dim, block_size,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], k_cache.stride(3), *v_cache.stride(), out.stride(0),
        out.stride(1), tables.stride(0),
        GROUP=triton.next_power_of_2(num_heads // kv_heads), BLOCK_P=triton.next_power_of_2(block_size),
        HEAD=triton.next_power_of_2(head_dim), SOFTCAP=softcap is not None,
    )  # fmt: skip
    return out
