"""Shared pieces of the benchmarks: workloads, timing and running our engine in-process."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import torch

from server.engine.sequence import SamplingParams


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
