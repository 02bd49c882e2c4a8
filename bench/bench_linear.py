"""Which GEMM a decode step should use: oneDNN's packed weights or the plain ones, by batch size.

1. One decode step of the default model alone (context 40) for 1, 2, 3, 4 and 8 sequences, with every projection on
   the packed path and then on the plain path, taking turns for 20 rounds; prints the median step times and the
   median of the rounds' plain / packed ratios. `server.model.linear.PLAIN_MAX_ROWS[dtype]` is set from this.
2. The same step for 8 and 32 sequences with a random r=16 all-linear adapter merged into every layer, its merged
   weights plain (as right after a merge) and packed (once `WeightMerger.pack_next` has run for every layer).

Usage: .venv/bin/python -m bench.bench_linear [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from bench.common import decode_batch, paired_ratio, step_ms
from server.adapters.slots import attach_lora_slots
from server.adapters.weights import ModelInfo, validate_adapter_dir
from server.model import linear
from server.model.default_model import default_model_dir
from server.model.kv_cache import KVCache
from server.model.linear import PLAIN_MAX_ROWS
from server.model.loader import LoadedModel, load_model
from server.model.merge import WeightMerger

PATHS = {"packed": -1, "plain": 1 << 30}  # PLAIN_MAX_ROWS[dtype] for each path


def merged_rows(loaded: LoadedModel, cache: KVCache) -> None:
    """Case 2: an adapter merged into every layer, its merged weights plain vs packed."""
    root = Path(tempfile.mkdtemp(prefix="bench-linear-"))
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(hf, config, adapter_name="x").save_pretrained(root, selected_adapters=["x"])
    attach_lora_slots(loaded.model, max_loras=1)
    updates = validate_adapter_dir(root / "x", ModelInfo.from_model(loaded.model), max_lora_rank=16).updates
    merger = WeightMerger(loaded.model.projections)
    merger.merge(updates)
    while merger.needs_packing:
        merger.pack_next()
    packed = {layer: layer.merged_packed for layer in merger.merged_layers}
    print(f"{'merged, sequences':>17} {'plain ms':>9} {'packed ms':>10} {'packed / plain':>15}")
    for n in (8, 32):
        batch = decode_batch(n)
        times: dict[str, list[float]] = {"plain": [], "packed": []}
        step_ms(loaded, batch, cache)
        for _ in range(10):
            for case in times:
                for layer, copy in packed.items():
                    layer.serve_merged(layer.merged, copy if case == "packed" else None)
                times[case].append(step_ms(loaded, batch, cache))
        ratio = paired_ratio(times["packed"], times["plain"])
        plain, pack = (statistics.median(times[case]) for case in times)
        print(f"{n:17} {plain:9.2f} {pack:10.2f} {ratio:15.3f}", flush=True)
    merger.unmerge()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    dtype = getattr(torch, parser.parse_args().dtype)
    loaded = load_model(default_model_dir(), torch.device("cpu"), dtype)
    cache = KVCache(loaded.spec, num_blocks=128, block_size=16, dtype=dtype, device="cpu")
    print(f"{'sequences':>9} {'packed ms':>10} {'plain ms':>9} {'plain / packed':>15}")
    for n in (1, 2, 3, 4, 8):
        batch = decode_batch(n)
        times: dict[str, list[float]] = {path: [] for path in PATHS}
        step_ms(loaded, batch, cache)
        for _ in range(20):
            for path, rows in PATHS.items():
                linear.PLAIN_MAX_ROWS = {**PLAIN_MAX_ROWS, dtype: rows}
                times[path].append(step_ms(loaded, batch, cache))
        ratio = paired_ratio(times["plain"], times["packed"])
        packed, plain = (statistics.median(times[path]) for path in PATHS)
        print(f"{n:9} {packed:10.2f} {plain:9.2f} {ratio:15.3f}", flush=True)
    linear.PLAIN_MAX_ROWS = PLAIN_MAX_ROWS
    merged_rows(loaded, cache)


if __name__ == "__main__":
    main()
