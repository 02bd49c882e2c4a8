"""The Triton kernels at a real model's shapes on a GPU: error against the torch reference, and time next to torch ops.

Part of `bench.bench_gpu`. LoRA: one qkv projection of the checkpoint's shape with 128 resident adapters (ranks 8,
16 and 64, some DoRA) and 256 decode tokens over them; decode attention: 256 rows at context 192 (64 + 128) in bf16.
Errors are ‖out − ref‖ / ‖ref‖ over the adapter deltas (LoRA) or the outputs (attention).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import triton.testing

from server.model import backend
from server.model.attention import AttentionPlan, paged_attention
from server.model.batch import ForwardBatch
from server.model.linear import TargetLinear
from server.model.lora import lora_reference
from server.model.lora_weights import LoraWeights
from server.model.routing import make_lora_batch

ROWS, CONTEXT, BLOCK, ADAPTERS = 256, 192, 16, 128


@contextlib.contextmanager
def torch_ops() -> Iterator[None]:
    """The forward's torch-op path on CUDA, for the reference and the comparison."""
    saved = backend.triton_kernels
    backend.triton_kernels = lambda device: False
    try:
        yield
    finally:
        backend.triton_kernels = saved


def _ms(fn: Callable[[], object], return_mode: str) -> float:
    """Median milliseconds of `fn` (CUDA events); on CPU (a smoke run) one timed call."""
    if torch.cuda.is_available():
        return triton.testing.do_bench(fn, return_mode=return_mode)
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def bench_lora(put: Callable[[str, object], None], hidden: int, q: int, kv: int, dev: torch.device) -> None:
    bf16 = torch.bfloat16
    slices = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
    linear = TargetLinear(torch.randn(q + 2 * kv, hidden, device=dev, dtype=bf16) / hidden**0.5, slices)
    linear.enable_adapters(ADAPTERS)
    loaded = {}
    for slot in range(ADAPTERS):
        rank = (8, 16, 16, 64)[slot % 4]
        loaded[slot] = {
            name: LoraWeights(torch.randn(rank, hidden, device=dev) / hidden**0.5,
                              torch.randn(end - start, rank, device=dev) / rank**0.5,
                              1 + 0.1 * torch.randn(end - start, device=dev) if slot % 8 == 0 else None)
            for name, (start, end) in slices.items()
        }  # fmt: skip
        linear.lora.load_slot(slot, {n: w.to(dtype=bf16) for n, w in loaded[slot].items()})
    token_slots = torch.randint(0, ADAPTERS, (ROWS,), device=dev)
    x = torch.randn(ROWS, hidden, device=dev, dtype=bf16)
    batch = make_lora_batch(token_slots)
    base = x @ linear.weight.T
    with torch.inference_mode():
        got = linear(x, batch)
        with torch_ops():
            torch_out = linear(x, batch)
            torch_ms = _ms(lambda: linear(x, batch), return_mode="median")
        triton_ms = _ms(lambda: linear(x, batch), return_mode="median")
        base_ms = _ms(lambda: x @ linear.weight.T, return_mode="median")
    want = base.float()
    for name, (start, end) in slices.items():
        lora_reference(x.float(), want[:, start:end], {s: w[name] for s, w in loaded.items()}, token_slots)
    put("kernels.lora.rel_err_triton", _rel(got - base, want - base.float()))
    put("kernels.lora.rel_err_torch_ops", _rel(torch_out - base, want - base.float()))
    put("kernels.lora.qkv_ms (base GEMM, +torch ops, +triton)", [round(t, 4) for t in (base_ms, torch_ms, triton_ms)])


def bench_decode_attention(
    put: Callable[[str, object], None], heads: int, kv_heads: int, head_dim: int, dev: torch.device
) -> None:
    bf16 = torch.bfloat16
    per_row = CONTEXT // BLOCK
    blocks = torch.randperm(ROWS * per_row, device=dev).view(ROWS, per_row)  # interleaved, as the manager hands out
    k_cache = torch.randn(ROWS * per_row, kv_heads, head_dim, BLOCK, device=dev, dtype=bf16)
    v_cache = torch.randn(ROWS * per_row, kv_heads, BLOCK, head_dim, device=dev, dtype=bf16)
    lens = torch.randint(CONTEXT // 2, CONTEXT + 1, (ROWS,), device=dev)
    batch = ForwardBatch(
        input_ids=torch.zeros(ROWS, dtype=torch.int64, device=dev), positions=lens - 1,
        kv_slots=blocks[torch.arange(ROWS, device=dev), (lens - 1) // BLOCK] * BLOCK + (lens - 1) % BLOCK,
        query_start=torch.arange(ROWS + 1), context_lens=lens.cpu(), block_tables=blocks.cpu(),
        logits_indices=torch.arange(ROWS),
    )  # fmt: skip
    spec = type("Spec", (), {"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim})()
    q = torch.randn(ROWS, heads, head_dim, device=dev, dtype=bf16)
    with torch.inference_mode():
        plan = AttentionPlan.build(batch, BLOCK, spec)
        got = paged_attention(q, q, q, k_cache, v_cache, plan)
        triton_ms = _ms(lambda: paged_attention(q, q, q, k_cache, v_cache, plan), return_mode="median")
        with torch_ops():
            torch_plan = AttentionPlan.build(batch, BLOCK, spec)
            want = paged_attention(q.float(), q, q, k_cache.float(), v_cache.float(), torch_plan)
            torch_ms = _ms(lambda: paged_attention(q, q, q, k_cache, v_cache, torch_plan), return_mode="median")
    put("kernels.decode_attention.rel_err_triton", _rel(got, want))
    put("kernels.decode_attention_ms (torch ops, triton)", [round(torch_ms, 4), round(triton_ms, 4)])


def bench_kernels(put: Callable[[str, object], None], model_dir: Path, dev: torch.device) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    heads, kv_heads, hidden = config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    bench_lora(put, hidden, heads * head_dim, kv_heads * head_dim, dev)
    bench_decode_attention(put, heads, kv_heads, head_dim, dev)
