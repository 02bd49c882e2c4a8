"""Shared pieces of the benchmarks: workloads, timing and running our engine in-process."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass

import torch

from server.engine.batch_builder import build_forward_batch
from server.engine.sequence import SamplingParams, Sequence
from server.model.batch import ForwardBatch
from server.model.kv_cache import KVCache
from server.model.loader import LoadedModel
from server.model.routing import LoraBatch


@dataclass(frozen=True)
class Request:
    """One benchmark request: prompt token ids, tokens to generate, and the adapter (None = base)."""

    prompt: list[int]
    max_tokens: int
    adapter: str | None = None


def random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab - 100) for _ in range(length)]


def uniform_workload(n: int, prompt_len: int, out_len: int, vocab: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    return [Request(random_prompt(rng, prompt_len, vocab), out_len) for _ in range(n)]


def mixed_workload(n: int, vocab: int, seed: int = 0) -> list[Request]:
    """Prompt lengths 16-512 and output lengths 8-256, uniformly drawn."""
    rng = random.Random(seed)
    return [Request(random_prompt(rng, rng.randint(16, 512), vocab), rng.randint(8, 256)) for _ in range(n)]


async def run_engine(engine, requests: list[Request]) -> tuple[float, int]:
    """Submit all requests at once; returns (seconds, generated tokens)."""

    async def one(i: int, req: Request) -> int:
        params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True)
        count = 0
        async for out in engine.generate(req.prompt, params, req.adapter, f"bench-{i}"):
            count += len(out.token_ids)
        return count

    start = time.perf_counter()
    counts = await asyncio.gather(*[one(i, r) for i, r in enumerate(requests)])
    return time.perf_counter() - start, sum(counts)


def engine_throughput(engine, requests: list[Request]) -> float:
    seconds, tokens = asyncio.run(run_engine(engine, requests))
    return tokens / seconds


def hf_static_throughput(model, requests: list[Request], batch_size: int, pad_id: int) -> float:
    """transformers `generate` in static batches (left padded), each running to its longest output.

    Only the tokens each request asked for count; the rest is the padding cost static batching pays.
    """
    useful = sum(r.max_tokens for r in requests)
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        chunk = requests[i : i + batch_size]
        width = max(len(r.prompt) for r in chunk)
        ids = torch.tensor([[pad_id] * (width - len(r.prompt)) + r.prompt for r in chunk])
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in chunk])
        new = max(r.max_tokens for r in chunk)
        with torch.inference_mode():
            model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                pad_token_id=pad_id,
            )  # fmt: skip
    return useful / (time.perf_counter() - start)


def decode_batch(n: int, adapter_slots: list[int] | None = None) -> ForwardBatch:
    """One decode step of `n` sequences at context 40 (blocks of 16 tokens, 3 per sequence), for timing the model."""
    seqs = []
    for i in range(n):
        seq = Sequence(str(i), list(range(100, 140)), SamplingParams())
        seq.block_table.extend(range(3 * i, 3 * i + 3))
        seq.num_computed_tokens = 39  # the step computes the 40th token
        seqs.append(seq)
    return build_forward_batch([(seq, 1) for seq in seqs], 16, torch.device("cpu"), adapter_slots)


def step_ms(loaded: LoadedModel, batch: ForwardBatch, cache: KVCache, lora: LoraBatch | None = None,
            repeats: int = 2) -> float:  # fmt: skip
    """Mean time (ms) of the model's forward and logits for `batch`, over `repeats` runs."""
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(repeats):
            hidden = loaded.model(batch, cache, lora)
            loaded.model.compute_logits(hidden[batch.logits_indices])
    return 1e3 * (time.perf_counter() - start) / repeats


def paired_ratio(ours: list[float], base: list[float]) -> float:
    """Median over rounds of the ratio of two cases measured next to each other: drift cancels within a round."""
    return statistics.median(a / b for a, b in zip(ours, base, strict=True))
