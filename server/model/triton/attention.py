"""Paged decode attention in Triton, reading `server.model.kv_cache`'s pools in place.

One program per (decode row, query head) walks the row's block table with an online softmax in float32: keys come
as one block's [head_dim, block_size] tile (the cache stores them transposed), values as [block_size, head_dim].
A query head reads KV head `head // (heads / kv_heads)` (GQA). A sliding window starts the walk at the window's first
block and masks the positions before it; Gemma 2's soft-cap bends the scores before the mask, as the torch path does
(`server.model.attention._decode_attention`, the reference). Positions past a row's length are never loaded, so
stale values in a reused block cannot reach the sum.
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
    BLOCK_P: tl.constexpr, HEAD: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    row, head = tl.program_id(0), tl.program_id(1)
    kv_head = (head // group).to(tl.int64)
    token = tl.load(tokens + row).to(tl.int64)
    length = tl.load(lens + row)
    offs_d = tl.arange(0, HEAD)
    d_mask = offs_d < head_dim
    query = tl.load(q + token * sq_t + head * sq_h + offs_d, mask=d_mask, other=0.0).to(tl.float32) * scale
    first = tl.maximum(length - window, 0)  # the first key the window sees; `window` is huge without one
    offs_p = tl.arange(0, BLOCK_P)
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros((HEAD,), dtype=tl.float32)
    for blk in range(first // block_size, tl.cdiv(length, block_size)):
        block = tl.load(tables + row * st_r + blk).to(tl.int64)
        pos = blk * block_size + offs_p
        valid = (offs_p < block_size) & (pos < length) & (pos >= first)
        k_ptrs = k_cache + block * sk_b + kv_head * sk_h + offs_d[:, None] * sk_d + offs_p[None, :] * sk_p
        keys = tl.load(k_ptrs, mask=d_mask[:, None] & valid[None, :], other=0.0).to(tl.float32)  # [HEAD, BLOCK_P]
        scores = tl.sum(query[:, None] * keys, axis=0)  # [BLOCK_P]
        if SOFTCAP:
            scores = softcap * (2.0 * tl.sigmoid(2.0 * scores / softcap) - 1.0)  # softcap · tanh(scores / softcap)
        scores = tl.where(valid, scores, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        probs = tl.exp(scores - m_new)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(probs, axis=0)
        v_ptrs = v_cache + block * sv_b + kv_head * sv_h + offs_p[:, None] * sv_p + offs_d[None, :] * sv_d
        values = tl.load(v_ptrs, mask=valid[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_P, HEAD]
        acc = acc * alpha + tl.sum(probs[:, None] * values, axis=0)
        m_i = m_new
    tl.store(out + row * so_r + head * so_h + offs_d, (acc / l_i).to(out.dtype.element_ty), mask=d_mask)


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
    _decode_kernel[(rows, num_heads)](
        q, k_cache, v_cache, out, tokens, tables, lens, scale, softcap or 1.0, window or NO_WINDOW,
        num_heads // kv_heads, head_dim, block_size,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], k_cache.stride(3), *v_cache.stride(), out.stride(0),
        out.stride(1), tables.stride(0),
        BLOCK_P=triton.next_power_of_2(block_size), HEAD=triton.next_power_of_2(head_dim), SOFTCAP=softcap is not None,
    )  # fmt: skip
    return out
