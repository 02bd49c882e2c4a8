"""Which base GEMM a decode step should use: oneDNN's packed weights or the plain ones, by batch size.

One decode step of the default model alone (context 40) for 1, 2, 3, 4 and 8 sequences, with every projection on
the packed path and then on the plain path, taking turns for 20 rounds; prints the median step times and the median
of the rounds' plain / packed ratios. `server.model.linear.PLAIN_MAX_ROWS` is set from this.

Usage: .venv/bin/python -m bench.bench_linear
"""

from __future__ import annotations

import statistics
import time

import torch

from server.engine.batch_builder import build_forward_batch
from server.engine.sequence import SamplingParams, Sequence
from server.model import linear
from server.model.default_model import default_model_dir
from server.model.kv_cache import KVCache
from server.model.loader import LoadedModel, load_model

PATHS = {"packed": 0, "plain": 1 << 30}  # PLAIN_MAX_ROWS for each path


def decode_batch(n: int):
    seqs = []
    for i in range(n):
        seq = Sequence(str(i), list(range(100, 140)), SamplingParams())
        seq.block_table.extend(range(3 * i, 3 * i + 3))
        seq.num_computed_tokens = 39  # the step computes the 40th token
        seqs.append(seq)
    return build_forward_batch([(seq, 1) for seq in seqs], 16, torch.device("cpu"))


def step_ms(loaded: LoadedModel, batch, cache: KVCache, repeats: int = 2) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(repeats):
            hidden = loaded.model(batch, cache, None)
            loaded.model.compute_logits(hidden[batch.logits_indices])
    return 1e3 * (time.perf_counter() - start) / repeats


def main() -> None:
    loaded = load_model(default_model_dir(), torch.device("cpu"), torch.float32)
    cache = KVCache(loaded.spec, num_blocks=32, block_size=16, dtype=torch.float32, device="cpu")
    print(f"{'sequences':>9} {'packed ms':>10} {'plain ms':>9} {'plain / packed':>15}")
    for n in (1, 2, 3, 4, 8):
        batch = decode_batch(n)
        times: dict[str, list[float]] = {path: [] for path in PATHS}
        step_ms(loaded, batch, cache)
        for _ in range(20):
            for path, rows in PATHS.items():
                linear.PLAIN_MAX_ROWS = rows
                times[path].append(step_ms(loaded, batch, cache))
        ratio = statistics.median(a / b for a, b in zip(times["plain"], times["packed"], strict=True))
        packed, plain = (statistics.median(times[path]) for path in PATHS)
        print(f"{n:9} {packed:10.2f} {plain:9.2f} {ratio:15.3f}", flush=True)


if __name__ == "__main__":
    main()
