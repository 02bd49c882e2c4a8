"""Share of a decode step spent in attention, on whatever commit is checked out (run it before and after a change).

The default model alone, one decode step of 1 and 32 sequences at contexts 128 and 512, 10 turns each:
`server.model.decoder.paged_attention` (the cache read and the attention maths; not the K/V write) is wrapped in a
timer and its time is set against the whole step's (forward and logits). The script uses only what every commit since
the paged cache has: copy it out (`git show attention-fast:bench/bench_attention.py > /tmp/bench_attention.py`)
to measure an older checkout.

Usage: .venv/bin/python -m bench.bench_attention
"""

from __future__ import annotations

import statistics
import time

import torch

from server.engine.batch_builder import build_forward_batch
from server.engine.sequence import SamplingParams, Sequence
from server.model import decoder
from server.model.default_model import default_model_dir
from server.model.kv_cache import KVCache
from server.model.loader import load_model

BLOCK = 16
attention_seconds = [0.0]


def timed(function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = function(*args, **kwargs)
        attention_seconds[0] += time.perf_counter() - start
        return out

    return wrapper


def decode_batch(n: int, context: int):
    """One decode step of `n` sequences at `context` keys; blocks interleaved between sequences, as in a server."""
    blocks = -(-context // BLOCK)
    seqs = []
    for i in range(n):
        seq = Sequence(str(i), [100 + t % 1000 for t in range(context)], SamplingParams())
        seq.block_table.extend(i + n * b for b in range(blocks))
        seq.num_computed_tokens = context - 1
        seqs.append(seq)
    return build_forward_batch([(seq, 1) for seq in seqs], BLOCK, torch.device("cpu")), n * blocks


def main() -> None:
    loaded = load_model(default_model_dir(), torch.device("cpu"), torch.float32)
    decoder.paged_attention = timed(decoder.paged_attention)
    print(f"{'sequences':>9} {'context':>8} {'step ms':>8} {'attention ms':>13} {'attention share':>16}")
    for n, context in ((1, 128), (1, 512), (32, 128), (32, 512)):
        batch, blocks = decode_batch(n, context)
        cache = KVCache(loaded.spec, num_blocks=blocks, block_size=BLOCK, dtype=torch.float32, device="cpu")
        steps, shares = [], []
        with torch.inference_mode():
            for turn in range(11):
                attention_seconds[0] = 0.0
                start = time.perf_counter()
                hidden = loaded.model(batch, cache)
                loaded.model.compute_logits(hidden[batch.logits_indices])
                seconds = time.perf_counter() - start
                if turn:  # the first turn warms up
                    steps.append(seconds)
                    shares.append(attention_seconds[0] / seconds)
        step = statistics.median(steps)
        share = statistics.median(shares)
        print(f"{n:9} {context:8} {1e3 * step:8.2f} {1e3 * step * share:13.2f} {share:16.3f}", flush=True)


if __name__ == "__main__":
    main()
