"""One batch-1 decode step with an adapter merged against the base model, in process, for any checkpoint.

Loads the model in bf16, makes one random rank-`--rank` LoRA adapter on all seven projections (`bench.real_shapes`),
times the base step, merges the adapter and packs every merged layer (`WeightMerger.pack_next` until none is left,
as the engine does one layer per step), times the merged step, unmerges and times the base step again; each the
median of `--rounds` steps after two warm-ups. Separates the merged GEMMs' cost from the server's packing delay.

Usage: .venv/bin/python -m bench.bench_merged_step MODEL_DIR [--context 128] [--rank 16] [--rounds 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_fused import BLOCK, step_batch
from bench.real_shapes import make_lora_store
from server.adapters.slots import attach_lora_slots
from server.adapters.weights import ModelInfo, validate_adapter_dir
from server.model.kv_cache import KVCache
from server.model.loader import load_model
from server.model.merge import WeightMerger
from server.model.routing import MERGED_SLOT, make_lora_batch
from server.threads import use_engine_threads


def step_ms(loaded, batch, cache, lora, rounds: int) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(rounds + 2):
            start = time.perf_counter()
            loaded.model.compute_logits(loaded.model(batch, cache, lora)[batch.logits_indices])
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    use_engine_threads()
    loaded = load_model(args.model, torch.device("cpu"), torch.bfloat16)
    attach_lora_slots(loaded.model, 1)
    with tempfile.TemporaryDirectory() as tmp:
        name = make_lora_store(args.model, Path(tmp), 1, args.rank)[0]
        weights = validate_adapter_dir(Path(tmp) / name, ModelInfo.from_model(loaded.model), 64)
    base, blocks = step_batch(1, args.context, 1)
    merged, _ = step_batch(1, args.context, 1, [MERGED_SLOT])
    cache = KVCache(loaded.spec, blocks, BLOCK, torch.bfloat16, torch.device("cpu"))
    merger = WeightMerger(loaded.model.projections)
    print(f"base              {step_ms(loaded, base, cache, None, args.rounds):7.1f} ms")
    merger.merge(weights.updates)
    packed = 0
    while merger.needs_packing:
        merger.pack_next()
        packed += 1
    lora = make_lora_batch(merged.adapter_slots)
    print(f"merged            {step_ms(loaded, merged, cache, lora, args.rounds):7.1f} ms  ({packed} layers packed)")
    merger.unmerge()
    print(f"base after unmerge{step_ms(loaded, base, cache, None, args.rounds):7.1f} ms")


if __name__ == "__main__":
    main()
