"""Attention over the paged KV cache, planned once per step and reused by every layer.

Decode rows (one query token each) read the cache in place: two `embedding_bag` reductions, one for the scores
(each bag is one query head against one cached block: `head_dim` key rows of `block_size` positions, weighted by
the query's features) and one for the output (each bag sums a head's value rows weighted by its probabilities).
Nothing is copied per layer but the query and the scores; the index tensors are built once per step. Gathering
each sequence's K/V into a padded tensor for `scaled_dot_product_attention` instead cost 2.5-3x as much per layer
(bench/bench_attention.py). With the fused bf16 kernels (`server.model.kernels`) one C++ op does the same for every
decode row, block by block in float32, and needs only each row's block table and length. Each prefill (or prefill
chunk) runs its own causal SDPA call; a chunk after cached blocks gathers those blocks first. Per layer,
`AttentionOptions` adds a score scale, a sliding window (a mask on prefill, a later start on decode) and Gemma 2's
soft-capping (prefill then runs transformers' eager maths, which SDPA cannot express).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from server.model import backend
from server.model.architecture import ModelSpec
from server.model.batch import ForwardBatch


@dataclass
class PrefillSpan:
    """One sequence with several query tokens this step."""

    start: int  # first token of the sequence in the packed batch
    end: int
    context_len: int  # keys after this step (cached + new)
    blocks: torch.Tensor | None  # [ceil(context_len / block_size)] cache blocks to read; None = use fresh K/V


@dataclass
class DecodeBags:
    """Indices of the `embedding_bag` decode reductions: D rows, H query heads, contexts padded to L = n · block_size.

    Bags are given as flat indices and offsets (fixed-width bags given as 2-D indices make `embedding_bag` build
    their offsets on every call).
    """

    score_index: torch.Tensor  # [D * H * n * head_dim] rows of `k_cache.view(-1, block_size)`, padding reads block 0
    score_offsets: torch.Tensor  # [D * H * n] start of each (row, head, block) bag
    value_index: torch.Tensor  # [D * H * L] rows of `v_cache.view(-1, head_dim)`, padding reads the row's first
    value_offsets: torch.Tensor  # [D * H] start of each (row, head) bag
    pad: torch.Tensor  # [D, 1, L] True where the position is past the row's context


@dataclass
class DecodePlan:
    """The decode rows of a step: D rows reading n cache blocks at most."""

    tokens: torch.Tensor  # [D] packed index of each decode token
    blocks: int  # n, blocks read per row
    tables: torch.Tensor  # [D, n] cache blocks of each row (the fused kernel reads the first ceil(len / block_size))
    lens: torch.Tensor  # [D] keys of each row
    bags: DecodeBags | None  # the embedding_bag indices, for the torch-op path only
    window_pads: dict[int, torch.Tensor] = field(default_factory=dict)  # window -> [D, 1, L], made by the first layer


@dataclass
class AttentionPlan:
    """Index tensors derived from the batch once per step, shared by all layers."""

    slots: torch.Tensor  # [T] flat cache slot each token's K/V go to
    write_blocks: torch.Tensor  # [T] cache block of that slot
    write_offsets: torch.Tensor  # [T] position inside that block
    decode: DecodePlan | None
    prefills: list[PrefillSpan]
    fused: bool  # attention runs the fused decode kernel

    @classmethod
    def build(cls, batch: ForwardBatch, block_size: int, spec: ModelSpec, fused: bool = False) -> AttentionPlan:
        starts = batch.query_start.tolist()
        ctx = batch.context_lens.tolist()
        decode_rows, prefills = [], []
        for i, c in enumerate(ctx):
            q_len = starts[i + 1] - starts[i]
            if q_len == 1 and c > 1:
                decode_rows.append(i)
            else:
                blocks = None if q_len == c else batch.block_tables[i, : -(-c // block_size)]
                prefills.append(PrefillSpan(starts[i], starts[i + 1], c, blocks))
        decode = _decode_plan(batch, decode_rows, block_size, spec, fused) if decode_rows else None
        slots = batch.kv_slots
        return cls(slots, slots // block_size, slots % block_size, decode, prefills, fused)


def _decode_plan(batch: ForwardBatch, rows: list[int], block_size: int, spec: ModelSpec, fused: bool) -> DecodePlan:
    device = batch.input_ids.device
    num_blocks = -(-max(int(batch.context_lens[i]) for i in rows) // block_size)
    index = torch.tensor(rows, device=device)
    tables = batch.block_tables.to(device)[index, :num_blocks]  # [D, n]
    lens = batch.context_lens.to(device)[index]  # [D]
    tokens = batch.query_start[:-1].to(device)[index]
    bags = None if fused or backend.triton_kernels(device) else _decode_bags(tables, lens, block_size, spec)
    return DecodePlan(tokens, num_blocks, tables.contiguous(), lens, bags)


def _decode_bags(tables: torch.Tensor, lens: torch.Tensor, block_size: int, spec: ModelSpec) -> DecodeBags:
    device = tables.device
    num_blocks = tables.shape[1]
    group = spec.num_heads // spec.num_kv_heads
    kv_head = torch.arange(spec.num_heads, device=device) // group  # [H] KV head each query head reads
    head_rows = tables[:, None, :] * spec.num_kv_heads + kv_head[None, :, None]  # [D, H, n] (block, kv head) rows
    features = torch.arange(spec.head_dim, device=device)
    score_index = (head_rows[..., None] * spec.head_dim + features).flatten()
    positions = torch.arange(num_blocks * block_size, device=device)  # [L]
    value_index = head_rows[:, :, positions // block_size] * block_size + positions % block_size  # [D, H, L]
    pad = (positions[None, :] >= lens[:, None]).unsqueeze(1)  # [D, 1, L]
    # Padding reads the row's own first position, never stale or foreign values: a probability of 0 times a NaN
    # left there (a request whose adapter overflowed) would poison the sum. Padded scores are overwritten by -inf.
    value_index = torch.where(pad, value_index[:, :, :1], value_index).flatten()
    return DecodeBags(
        score_index, torch.arange(0, score_index.numel(), spec.head_dim, device=device),
        value_index, torch.arange(0, value_index.numel(), positions.numel(), device=device),
        pad,
    )  # fmt: skip


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan, k: torch.Tensor, v: torch.Tensor):
    """Store this step's K/V. k, v: [T, kv_heads, head_dim]; caches as in `server.model.kv_cache.KVCache`."""
    k_cache[plan.write_blocks, :, :, plan.write_offsets] = k
    v_cache[plan.write_blocks, :, plan.write_offsets] = v


@dataclass(frozen=True)
class AttentionOptions:
    """How one layer attends, beyond the plan shared by all layers."""

    scale: float | None = None  # scores q·k are multiplied by it; None: head_dim ** -0.5
    window: int | None = None  # keys a query sees, itself included (sliding-window layers); None: all
    softcap: float | None = None  # scores -> softcap · tanh(scores / softcap) before masking (Gemma 2)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: AttentionPlan,
    options: AttentionOptions = AttentionOptions(),
) -> torch.Tensor:
    """Attend each token to its sequence's cached and fresh keys. Fresh K/V must already be in the cache.

    q: [T, heads, head_dim]; k, v: [T, kv_heads, head_dim] (this step's); caches: one layer of `KVCache`.
    Returns [T, heads * head_dim].
    """
    num_tokens, num_heads, head_dim = q.shape
    if plan.decode is not None and not plan.prefills and not plan.fused:  # decode only: the rows are the tokens
        return _decode_attention(q, k_cache, v_cache, plan.decode, options).view(num_tokens, num_heads * head_dim)
    out = q.new_empty(q.shape)  # q may be a view of the fused q,k rows
    for span in plan.prefills:
        # SDPA takes its CPU flash kernel only for 4-D inputs, [1, heads, len, head_dim] here; 3-D ones run the
        # unfused maths, 1.7x slower for 64 tokens and 3-4x for 512 (bf16 and fp32 alike).
        q_i = q[span.start : span.end].transpose(0, 1).unsqueeze(0)
        if span.blocks is None:
            k_i, v_i = (t[span.start : span.end].transpose(0, 1).unsqueeze(0) for t in (k, v))
        else:
            k_i, v_i = (t.unsqueeze(0) for t in _gather_context(k_cache, v_cache, span))
        out[span.start : span.end] = _prefill_attention(q_i, k_i, v_i, span, options)[0].transpose(0, 1)
    decode = plan.decode
    if decode is not None and plan.fused:
        scale = options.scale if options.scale is not None else head_dim**-0.5
        torch.ops.loraplex.decode_attention(
            q, k_cache, v_cache, decode.tokens, decode.tables, decode.lens, out, scale, options.window or 0
        )
    elif decode is not None:
        out[decode.tokens] = _decode_attention(q, k_cache, v_cache, decode, options)
    return out.view(num_tokens, num_heads * head_dim)


def _prefill_attention(q_i, k_i, v_i, span: PrefillSpan, options: AttentionOptions) -> torch.Tensor:
    """One sequence's chunk: q_i [1, heads, q_len, d] against k_i, v_i [1, kv_heads, context_len, d]."""
    q_len = span.end - span.start
    whole = span.blocks is None and (options.window is None or q_len <= options.window)
    if options.softcap is None and whole:
        return F.scaled_dot_product_attention(q_i, k_i, v_i, is_causal=True, scale=options.scale, enable_gqa=True)
    mask = _chunk_mask(span, q_i.device, options.window)
    if options.softcap is None:
        return F.scaled_dot_product_attention(q_i, k_i, v_i, attn_mask=mask, scale=options.scale, enable_gqa=True)
    return _softcapped_attention(q_i, k_i, v_i, mask, options)


def _softcapped_attention(q_i, k_i, v_i, mask: torch.Tensor, options: AttentionOptions) -> torch.Tensor:
    """Attention with soft-capped scores, in transformers' eager order: scale, cap, mask, float32 softmax."""
    group = q_i.shape[1] // k_i.shape[1]
    k_i, v_i = k_i.repeat_interleave(group, dim=1), v_i.repeat_interleave(group, dim=1)
    scale = options.scale if options.scale is not None else q_i.shape[-1] ** -0.5
    scores = torch.matmul(q_i, k_i.transpose(2, 3)) * scale  # [1, heads, q_len, context_len]
    scores = torch.tanh(scores / options.softcap) * options.softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(q_i.dtype), v_i)


def _decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: DecodePlan, options: AttentionOptions
) -> torch.Tensor:
    """softmax(q·Kᵀ/√d)·V for every decode row, reduced straight out of the pools. Returns [D, heads, head_dim]."""
    _, num_heads, head_dim = q.shape
    scale = options.scale if options.scale is not None else head_dim**-0.5
    bags = plan.bags
    if bags is None:  # planned for the Triton kernel (`server.model.backend`)
        from server.model.triton.attention import decode_attention

        return decode_attention(q, k_cache, v_cache, plan.tokens, plan.tables, plan.lens, scale, options.window,
                                options.softcap)  # fmt: skip
    rows = plan.tokens.shape[0]
    q_d = q if q.shape[0] == rows else q.index_select(0, plan.tokens)  # [D, H, head_dim]
    weights = q_d.unsqueeze(2).expand(rows, num_heads, plan.blocks, head_dim) * scale  # [D, H, n, hd]
    keys = k_cache.view(-1, k_cache.shape[-1])  # [blocks * kv_heads * head_dim, block_size]
    scores = F.embedding_bag(
        bags.score_index, keys, bags.score_offsets, mode="sum", per_sample_weights=weights.flatten()
    )  # [D * H * n, block_size]
    scores = scores.view(rows, num_heads, -1).float()  # [D, H, L]; softmax in float32 whatever the cache dtype
    if options.softcap is not None:
        scores = torch.tanh(scores / options.softcap) * options.softcap
    probs = scores.masked_fill_(_decode_pad(plan, options.window), float("-inf")).softmax(-1)
    values = v_cache.view(-1, head_dim)  # [blocks * kv_heads * block_size, head_dim]
    probs = probs.to(values.dtype).flatten()
    out = F.embedding_bag(bags.value_index, values, bags.value_offsets, mode="sum", per_sample_weights=probs)
    return out.view(rows, num_heads, head_dim)


def _decode_pad(plan: DecodePlan, window: int | None) -> torch.Tensor:
    """[D, 1, L]: True where a row must not look: past its context, or before its window (once per step and window)."""
    if window is None:
        return plan.bags.pad
    if window not in plan.window_pads:
        positions = torch.arange(plan.bags.pad.shape[-1], device=plan.lens.device)
        before = (positions[None, :] < (plan.lens - window)[:, None]).unsqueeze(1)
        plan.window_pads[window] = plan.bags.pad | before
    return plan.window_pads[window]


def _gather_context(
    k_cache: torch.Tensor, v_cache: torch.Tensor, span: PrefillSpan
) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefill chunk's keys and values, cached and fresh: [kv_heads, context_len, head_dim] each."""
    n = span.blocks.shape[0]
    kv_heads, head_dim, block_size = k_cache.shape[1:]
    k_i = k_cache.index_select(0, span.blocks).permute(1, 0, 3, 2).reshape(kv_heads, n * block_size, head_dim)
    v_i = v_cache.index_select(0, span.blocks).transpose(0, 1).reshape(kv_heads, n * block_size, head_dim)
    return k_i[:, : span.context_len], v_i[:, : span.context_len]


def _chunk_mask(span: PrefillSpan, device: torch.device, window: int | None = None) -> torch.Tensor:
    # Query j of the chunk sits at absolute position context_len - q_len + j and sees keys up to it (and, in a
    # sliding window, none `window` or more positions back).
    q_len = span.end - span.start
    q_pos = torch.arange(span.context_len - q_len, span.context_len, device=device).unsqueeze(1)
    k_pos = torch.arange(span.context_len, device=device).unsqueeze(0)
    mask = q_pos >= k_pos  # [q_len, ctx]
    return mask if window is None else mask & (q_pos - k_pos < window)
