"""Where one decode step's time goes, by operator, for any checkpoint (issue #24's real-size shapes).

One bf16 decode step of `--batch` sequences at `--context` tokens, base model only and with every row on its own
adapter (`--adapters` random rank-`--rank` LoRA adapters on all seven projections, from `bench.real_shapes`),
profiled with torch's profiler over `--rounds` steps after a warm-up; the table groups the CPU time by operator:
the projections' GEMMs (`mkldnn::_linear_pointwise`, or `aten::linear`/`addmm`), the per-token adapter deltas
(`loraplex::lora_gather`), decode attention, the element-wise kernels, and the LM head (the last GEMM of a step).

Usage: .venv/bin/python -m bench.profile_step MODEL_DIR [--batch 32] [--context 128] [--adapters 32] [--rank 16]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.bench_fused import BLOCK, step_batch
from bench.real_shapes import make_lora_store
from server.adapters.slots import attach_lora_slots, load_adapter_slot
from server.adapters.weights import ModelInfo, validate_adapter_dir
from server.model.kv_cache import KVCache
from server.model.loader import load_model
from server.model.routing import make_lora_batch
from server.threads import use_engine_threads


def profile_steps(loaded, batch, cache, lora, rounds: int) -> tuple[float, list[tuple[str, float]]]:
    """Milliseconds per step, and (operator, ms per step) sorted by time, self CPU time."""
    with torch.inference_mode():
        for _ in range(2):
            loaded.model.compute_logits(loaded.model(batch, cache, lora)[batch.logits_indices])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(rounds):
                loaded.model.compute_logits(loaded.model(batch, cache, lora)[batch.logits_indices])
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1000 / rounds
    ops = sorted(((e.key, e.self_cpu_time_total / 1000 / rounds) for e in events), key=lambda kv: -kv[1])
    return total, ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    use_engine_threads()
    loaded = load_model(args.model, torch.device("cpu"), torch.bfloat16)
    attach_lora_slots(loaded.model, args.adapters)
    info = ModelInfo.from_model(loaded.model)
    with tempfile.TemporaryDirectory() as tmp:
        for slot, name in enumerate(make_lora_store(args.model, Path(tmp), args.adapters, args.rank)):
            load_adapter_slot(loaded.model, slot, validate_adapter_dir(Path(tmp) / name, info, 64).updates)
    base_batch, blocks = step_batch(args.batch, args.context, 1)
    cache = KVCache(loaded.spec, blocks, BLOCK, torch.bfloat16, torch.device("cpu"))
    adapter_batch, _ = step_batch(args.batch, args.context, 1, [i % args.adapters for i in range(args.batch)])
    cases = [("base", base_batch, None), ("adapters", adapter_batch, make_lora_batch(adapter_batch.adapter_slots))]
    for name, batch, lora in cases:
        total, ops = profile_steps(loaded, batch, cache, lora, args.rounds)
        print(f"\n{name}: {total:.1f} ms per step (profiled CPU time)")
        for op, ms in ops[: args.top]:
            print(f"  {op:<40}{ms:>8.1f} ms  {100 * ms / total:5.1f} %")


if __name__ == "__main__":
    main()
