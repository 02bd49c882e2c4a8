"""What a stray OpenMP pool costs the engine (server/threads.py), one run.

The engine is measured in two fresh processes that differ in one thing: in `stray-pool`, the main thread runs one
parallel op with all cores before the engine starts (as it did when the main thread loaded the model), leaving an
idle libgomp pool behind; in `engine-only`, it does not. The processes take turns for 2 rounds; each reports
batch-1 time per token (32 prompt tokens, 64 generated, prefill included) and batch-32 throughput (64 in, 32 out).

Usage: .venv/bin/python -m bench.bench_threads
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys

import torch

from bench.common import Request, engine_throughput, random_prompt
from server.engine.factory import build_engine
from server.settings import Settings
from server.threads import pin_single_thread

VOCAB = 49152
CASES = ("engine-only", "stray-pool")


def child(case: str) -> None:
    if case == "stray-pool":
        torch.ones(2**22).mul_(2.0)  # a parallel op on the main thread: its pool lives as long as the thread
    else:
        pin_single_thread()
    engine = build_engine(Settings())
    rng = random.Random(0)
    try:
        engine_throughput(engine, [Request(random_prompt(rng, 16, VOCAB), 4)])  # warm-up
        one = Request(random_prompt(rng, 32, VOCAB), 64)
        batch1 = engine_throughput(engine, [one])
        batch32 = engine_throughput(engine, [Request(random_prompt(rng, 64, VOCAB), 32) for _ in range(32)])
    finally:
        engine.shutdown()
    print(json.dumps({"tpot_ms": 1e3 / batch1, "batch32_tok_s": batch32}))


def main() -> None:
    results: dict[str, list[dict]] = {case: [] for case in CASES}
    for _ in range(2):
        for case in CASES:
            out = subprocess.run([sys.executable, "-m", "bench.bench_threads", case], capture_output=True, text=True,
                                 check=True)  # fmt: skip
            results[case].append(json.loads(out.stdout.strip().splitlines()[-1]))
    for case, runs in results.items():
        tpot = statistics.median(r["tpot_ms"] for r in runs)
        tps = statistics.median(r["batch32_tok_s"] for r in runs)
        print(f"{case:12} batch-1 {tpot:6.1f} ms per token (prefill included)   batch-32 {tps:6.1f} tok/s")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        child(sys.argv[1])
    else:
        main()
