"""Prefix caching on vs off on the default model, side by side in one run (issue #16: prefix caching by adapter).

Shared: 8 r=8 q,v adapters x 16 requests; each adapter's requests start with the same 512-token task prefix and end
with a 32-token suffix of their own, generate 32 tokens (EOS ignored), all submitted at once, interleaved by adapter.
No-shared: the same shapes with every prompt random. Both engines (caching on and off) run in the same process and
take turns each round, with fresh prompts every round, so drift and earlier rounds' cached blocks cancel out.
Reports TTFT p50 and output throughput per case and the on/off ratios, medians over rounds.
Targets: shared TTFT p50 >= 4x better, shared throughput >= 2x, no-shared throughput within 3 %.

Usage:  .venv/bin/python -m bench.bench_prefix_cache [--rounds 3]
Smoke:  .venv/bin/python -m bench.bench_prefix_cache --model DIR --adapters 2 --per-adapter 2 --prefix-len 16 \
            --suffix-len 4 --output-len 2 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from bench.common import Request, random_prompt
from server.engine.factory import build_engine
from server.engine.sequence import SamplingParams
from server.model.default_model import default_model_dir
from server.settings import Settings
from server.threads import pin_single_thread


@dataclass(frozen=True)
class Shape:
    """The workload's sizes (the issue's defaults are the flags' defaults)."""

    adapters: int
    per_adapter: int
    prefix_len: int
    suffix_len: int
    output_len: int


@dataclass(frozen=True)
class RunResult:
    """One workload on one engine: median time to first token, output throughput, share of prompt tokens cached."""

    ttft_p50_s: float
    tokens_per_s: float
    cached_share: float


def make_adapters(model_dir: Path, root: Path, count: int) -> list[str]:
    """`count` random r=8 q,v LoRA adapters for the model, saved in PEFT layout under `root`."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    names = [f"task{i}" for i in range(count)]
    for i, name in enumerate(names):
        torch.manual_seed(i)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(base, config, adapter_name=name)
        model.save_pretrained(root, selected_adapters=[name])
        base = model.unload()
    return names


def shared_workload(names: list[str], shape: Shape, vocab: int, seed: int) -> list[Request]:
    """Each adapter's requests share its task prefix; interleaved by adapter, as mixed traffic arrives."""
    rng = random.Random(seed)
    prefixes = {name: random_prompt(rng, shape.prefix_len, vocab) for name in names}
    return [
        Request(prefixes[name] + random_prompt(rng, shape.suffix_len, vocab), shape.output_len, name)
        for _ in range(shape.per_adapter)
        for name in names
    ]


def unshared_workload(names: list[str], shape: Shape, vocab: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    length = shape.prefix_len + shape.suffix_len
    return [
        Request(random_prompt(rng, length, vocab), shape.output_len, name)
        for _ in range(shape.per_adapter)
        for name in names
    ]


async def _timed(engine, requests: list[Request], tag: str) -> RunResult:
    start = time.perf_counter()

    async def one(i: int, req: Request) -> tuple[float, int, int]:
        params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True)
        first, count, cached = 0.0, 0, 0
        async for out in engine.generate(req.prompt, params, req.adapter, f"{tag}-{i}"):
            if not count and out.token_ids:
                first = time.perf_counter() - start
            count += len(out.token_ids)
            cached = out.num_cached_tokens
        return first, count, cached

    results = await asyncio.gather(*[one(i, req) for i, req in enumerate(requests)])
    seconds = time.perf_counter() - start
    prompt_tokens = sum(len(req.prompt) for req in requests)
    return RunResult(
        ttft_p50_s=statistics.median(first for first, _, _ in results),
        tokens_per_s=sum(count for _, count, _ in results) / seconds,
        cached_share=sum(cached for _, _, cached in results) / prompt_tokens,
    )


def run(engine, requests: list[Request], tag: str) -> RunResult:
    return asyncio.run(_timed(engine, requests, tag))


def report(name: str, value: float, unit: str = "") -> None:
    print(f"{name:48} {value:10.3f} {unit}", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the default model)")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--per-adapter", type=int, default=16)
    parser.add_argument("--prefix-len", type=int, default=512)
    parser.add_argument("--suffix-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kv-cache-bytes", type=int, default=Settings.model_fields["kv_cache_bytes"].default)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    pin_single_thread()  # only the engine threads compute with every core, one at a time here (server.threads)
    shape = Shape(args.adapters, args.per_adapter, args.prefix_len, args.suffix_len, args.output_len)
    model_dir = args.model or default_model_dir()
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    root = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    names = make_adapters(model_dir, root, shape.adapters)
    common = dict(model=args.model, adapters_store=root, kv_cache_bytes=args.kv_cache_bytes, max_loras=len(names))
    engines = {mode: build_engine(Settings(**common, enable_prefix_caching=mode == "on")) for mode in ("on", "off")}
    results: dict[tuple[str, str], list[RunResult]] = {}
    try:
        for mode, engine in engines.items():  # warm-up: first-use adapter loads and allocations
            run(engine, unshared_workload(names, Shape(len(names), 1, 8, 8, 2), vocab, seed=10**6), f"warm-{mode}")
        for round_ in range(args.rounds):
            workloads = {
                "shared": shared_workload(names, shape, vocab, seed=2 * round_),
                "no-shared": unshared_workload(names, shape, vocab, seed=2 * round_ + 1),
            }
            for case, requests in workloads.items():
                for mode, engine in engines.items():
                    result = run(engine, requests, f"{case}-{mode}-{round_}")
                    results.setdefault((case, mode), []).append(result)
                    print(f"round {round_} {case:9} caching {mode:3}: TTFT p50 {1e3 * result.ttft_p50_s:9.1f} ms, "
                          f"{result.tokens_per_s:8.1f} tok/s, {100 * result.cached_share:5.1f} % of prompt tokens "
                          "cached", flush=True)  # fmt: skip
    finally:
        for engine in engines.values():
            engine.shutdown()

    def ratios(case: str, of) -> float:
        on, off = results[(case, "on")], results[(case, "off")]
        return statistics.median(of(a, b) for a, b in zip(on, off, strict=True))

    report("shared: TTFT p50 off / on (target >= 4)", ratios("shared", lambda a, b: b.ttft_p50_s / a.ttft_p50_s), "x")
    report("shared: throughput on / off (target >= 2)", ratios("shared", lambda a, b: a.tokens_per_s / b.tokens_per_s))
    report(
        "no-shared: throughput on / off (target 0.97-1.03)",
        ratios("no-shared", lambda a, b: a.tokens_per_s / b.tokens_per_s),
    )


if __name__ == "__main__":
    main()
