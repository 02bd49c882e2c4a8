"""Kernel-level A/B of the decode attention and the grouped SGMV, paired and interleaved in one process.

1. Decode attention of one layer of the default model's shapes, 1-64 sequences at contexts 128-1024 (blocks of 16,
   interleaved between sequences): the in-place `embedding_bag` reduction of `server.model.attention` against the
   previous path, which gathered every sequence's K/V slot by slot into a padded tensor for one
   `scaled_dot_product_attention` call (rebuilt here on a flat copy of the same cache).
2. The adapter update of the fused q,k,v projection for 32 prefill runs of 64 tokens on 32 distinct r=8 q,v
   adapters: one batched GEMM pair per projection (`_Slice.gemm_runs`) against one GEMM pair per run (`_Slice.sgmv`).

Prints medians of per-call times over 50 interleaved turns and the median of the turns' ratios.

Usage: .venv/bin/python -m bench.bench_kernels
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import AutoConfig

from server.model.architecture import ModelSpec
from server.model.attention import AttentionPlan, paged_attention, write_kv
from server.model.batch import ForwardBatch
from server.model.default_model import default_model_dir
from server.model.kv_cache import KVCache
from server.model.linear import TargetLinear
from server.model.lora_weights import LoraWeights
from server.model.routing import make_lora_batch

BLOCK = 16
TURNS = 50


def paired(cases: dict[str, Callable[[], object]]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in cases}
    for case in cases.values():
        case()
    for _ in range(TURNS):
        for name, case in cases.items():
            start = time.perf_counter()
            case()
            times[name].append(1e6 * (time.perf_counter() - start))
    return times


def decode_case(spec: ModelSpec, n: int, context: int) -> dict[str, Callable[[], object]]:
    blocks = -(-context // BLOCK)
    tables = torch.arange(n * blocks).view(blocks, n).T  # [n, blocks], interleaved
    slots = tables[:, -1] * BLOCK + (context - 1) % BLOCK
    batch = ForwardBatch(
        input_ids=torch.zeros(n, dtype=torch.int64), positions=torch.full((n,), context - 1), kv_slots=slots,
        query_start=torch.arange(n + 1), context_lens=torch.full((n,), context), block_tables=tables,
        logits_indices=torch.arange(n),
    )  # fmt: skip
    cache = KVCache(spec, n * blocks, BLOCK, torch.float32, torch.device("cpu"))
    k_cache, v_cache = cache.layer(0)
    k_cache.normal_()
    v_cache.normal_()
    plan = AttentionPlan.build(batch, BLOCK, spec)
    q = torch.randn(n, spec.num_heads, spec.head_dim)
    k, v = torch.randn(2, n, spec.num_kv_heads, spec.head_dim)
    write_kv(k_cache, v_cache, plan, k, v)
    # The previous layout: [slots, kv_heads, head_dim], one row per position.
    k_flat = k_cache.permute(0, 3, 1, 2).reshape(-1, spec.num_kv_heads, spec.head_dim)
    v_flat = v_cache.transpose(1, 2).reshape(-1, spec.num_kv_heads, spec.head_dim)
    positions = torch.arange(context)
    flat_slots = (tables[:, positions // BLOCK] * BLOCK + positions % BLOCK).reshape(-1)
    group = spec.num_heads // spec.num_kv_heads

    def gathered() -> torch.Tensor:
        q_d = q.view(n, spec.num_kv_heads, group, spec.head_dim)
        k_d = k_flat.index_select(0, flat_slots).view(n, context, spec.num_kv_heads, -1).transpose(1, 2)
        v_d = v_flat.index_select(0, flat_slots).view(n, context, spec.num_kv_heads, -1).transpose(1, 2)
        mask = torch.ones(n, 1, 1, context, dtype=torch.bool)
        return F.scaled_dot_product_attention(q_d, k_d, v_d, attn_mask=mask)

    in_place = lambda: paged_attention(q, k, v, k_cache, v_cache, plan)  # noqa: E731
    torch.testing.assert_close(in_place(), gathered().reshape(n, -1), atol=1e-4, rtol=1e-4)
    return {"gathered + SDPA": gathered, "in place": in_place}


def prefill_case(spec: ModelSpec, runs: int, length: int) -> dict[str, Callable[[], object]]:
    q, kv = spec.q_size, spec.kv_size
    slices = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
    layer = TargetLinear(torch.randn(q + 2 * kv, spec.hidden_size) * 0.02, slices)
    layer.enable_adapters(runs)
    for slot in range(runs):
        updates = {
            name: LoraWeights(a=torch.randn(8, spec.hidden_size) * 0.02, b=torch.randn(end - start, 8) * 0.02)
            for name, (start, end) in slices.items() if name != "k_proj"
        }  # fmt: skip
        layer.lora.load_slot(slot, updates)
    x = torch.randn(runs * length, spec.hidden_size)
    batch = make_lora_batch(torch.arange(runs).repeat_interleave(length))
    pieces = [piece for piece in layer.lora._slices.values() if piece.rank]
    y = torch.zeros(runs * length, q + 2 * kv)

    def per_run() -> None:
        for start, end, slot in batch.gemm_runs:
            for piece in pieces:
                piece.sgmv(x, y, start, end, slot)

    def grouped() -> None:
        for piece in pieces:
            piece.gemm_runs(x, y, batch)

    return {"GEMM pair per run": per_run, "grouped": grouped}


def report(title: str, times: dict[str, list[float]]) -> None:
    (base, base_t), (ours, ours_t) = times.items()
    ratio = statistics.median(a / b for a, b in zip(ours_t, base_t, strict=True))
    print(f"{title:34} {base}: {statistics.median(base_t):9.1f} µs   {ours}: {statistics.median(ours_t):9.1f} µs"
          f"   ratio {ratio:.3f}", flush=True)  # fmt: skip


def main() -> None:
    spec = ModelSpec.from_hf_config(AutoConfig.from_pretrained(default_model_dir()))
    with torch.inference_mode():
        for n, context in ((1, 128), (1, 1024), (8, 512), (32, 128), (32, 512), (64, 256)):
            report(f"decode attention, {n} x {context}", paired(decode_case(spec, n, context)))
        report("q,k,v update, 32 runs x 64 tokens", paired(prefill_case(spec, 32, 64)))


if __name__ == "__main__":
    main()
