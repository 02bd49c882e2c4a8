"""Speculative decoding against plain decoding, in process, on the default model in bf16 (issue #27).

Each workload runs on an engine without speculation, then on one per method (`--methods`: prompt lookup `ngram`,
`suffix` with each adapter's earlier outputs), greedy every time:

  json      batch 1, the `json-extract` adapter on its held-out prompts (chat template): median time per output
            token (TPOT) of each, and whether the outputs are identical (target: TPOT 1.8x better)
  chat      batch 1, free-form chat on the base model (target: no worse than 0.97x)
  m32       128 requests over 32 random r=8 q,v adapters, 32 in flight, the bench_vs_vllm workload: output
            tokens/s (target: at least 0.97x of speculation off); off and on alternate `--m32-rounds` times, each
            on a fresh engine, off first in even rounds and last in odd ones (this VM drifts by 10 % between
            runs, and a steady drift then favours neither), and the ratio is the median of the rounds'
  accept    acceptance rate per shipped task adapter on its held-out prompts (speculating engine only)

Before its timed pass each workload runs untimed on other prompts (held-out prompts 16-31 of the task, other chat
questions): the first forward of each new chunk length (a verification chunk is 2 to k + 1 tokens) costs up to a
second in bf16, and `suffix` then proposes from answers the adapter gave before, as it does on a server that has
been serving, never from the answers being timed. Timings only mean something on a quiet machine. `--quick` is a
smoke run (a few prompts, few tokens).

Usage: .venv/bin/python -m bench.bench_speculative [--quick] [--methods ngram,suffix] [--out F.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from bench.bench_vs_vllm import make_store
from server.engine.async_engine import AsyncEngine
from server.engine.factory import build_engine
from server.engine.sequence import SamplingParams
from server.model.default_model import default_model_dir
from server.settings import Settings
from server.threads import pin_single_thread
from training.evaluate import heldout
from training.tasks import TASKS

# Of k in {3, 4, 8} and minimum n in {1, 2}, this kept most tokens per step on the task adapters' held-out prompts
# (json-extract 1.3, extract-email 2.4 at batch 1; a minimum of 2 found almost no proposals in the JSON answers).
NGRAM = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}'
SUFFIX = '{"method": "suffix", "num_speculative_tokens": 6}'
METHODS = {"ngram": NGRAM, "suffix": SUFFIX}
STORE = Path("adapters_store")
CHATS = (
    "Tell me about the history of the bicycle.",
    "What are some good habits for staying healthy?",
    "Write a short story about a lighthouse keeper.",
    "Explain how a rainbow forms.",
    "What should I pack for a weekend hiking trip?",
    "Describe your ideal city to live in.",
    "How do plants make their food?",
    "Give me three tips for learning a new language.",
)
WARM_CHATS = (
    "What is the tallest mountain in Africa?",
    "Write a haiku about autumn leaves.",
    "How does a refrigerator keep food cold?",
    "Suggest a name for a friendly robot.",
    "Why do cats purr?",
    "Explain what a budget is to a child.",
    "What are the rules of chess in brief?",
    "Describe a sunrise over the sea.",
)


@dataclass(frozen=True)
class Job:
    prompt: list[int]
    adapter: str | None
    max_tokens: int
    ignore_eos: bool = False


async def _one(engine: AsyncEngine, job: Job, request_id: str) -> tuple[list[int], float | None]:
    """Its tokens and its time per output token after its first output (None when that was all of them)."""
    params = SamplingParams(max_tokens=job.max_tokens, temperature=0.0, ignore_eos=job.ignore_eos)
    tokens: list[int] = []
    first_time = last_time = 0.0
    first_count = 0
    async for out in engine.generate(job.prompt, params, job.adapter, request_id):
        last_time = time.perf_counter()
        if not first_count:
            first_time, first_count = last_time, len(out.token_ids)
        tokens += out.token_ids
    later = len(tokens) - first_count
    return tokens, (last_time - first_time) / later if later > 0 else None


def batch1(engine: AsyncEngine, jobs: list[Job], tag: str) -> tuple[list[list[int]], float]:
    """Each job alone, one after the other: outputs and the median TPOT in ms."""
    outputs, tpots = [], []
    for i, job in enumerate(jobs):
        tokens, tpot = asyncio.run(_one(engine, job, f"{tag}-{i}"))
        outputs.append(tokens)
        if tpot is not None:
            tpots.append(tpot * 1000)
    return outputs, statistics.median(tpots) if tpots else float("nan")


def throughput(engine: AsyncEngine, jobs: list[Job], tag: str, concurrency: int = 32) -> float:
    """Output tokens/s with `concurrency` jobs in flight."""

    async def run_all() -> int:
        gate = asyncio.Semaphore(concurrency)

        async def gated(job: Job, request_id: str) -> int:
            async with gate:
                return len((await _one(engine, job, request_id))[0])

        return sum(await asyncio.gather(*[gated(job, f"{tag}-{i}") for i, job in enumerate(jobs)]))

    start = time.perf_counter()
    count = asyncio.run(run_all())
    return count / (time.perf_counter() - start)


def chat_prompt(tokenizer, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def run_engine(settings: Settings, workloads: dict[str, tuple[list[Job], list[Job]]], m32: list[Job]) -> dict:
    """Each workload's (warm-up jobs, timed jobs) at batch 1, then m32's throughput, on one engine."""
    engine = build_engine(settings)
    try:
        deadline = time.monotonic() + 300
        while not engine.is_ready():
            if time.monotonic() > deadline:
                raise RuntimeError("the engine did not start")
            time.sleep(0.2)
        results: dict = {}
        for name, (warm, jobs) in workloads.items():
            batch1(engine, warm, f"warm-{name}")
            results[name] = batch1(engine, jobs, name)
        if m32:
            results["m32"] = throughput(engine, m32, "m32")
        speculator = engine.core.speculator
        if speculator is not None:
            results["acceptance"] = {
                (key or "base").split("@")[0]: speculator.accepted[key] / speculator.proposed[key]
                for key in speculator.proposed
                if speculator.proposed[key]
            }
        return results
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 prompts each, few tokens, 8 in m32")
    parser.add_argument("--methods", default="ngram,suffix", help="comma-separated, of: " + ", ".join(METHODS))
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts per task")
    parser.add_argument("--m32-rounds", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    methods = {name: METHODS[name] for name in args.methods.split(",")}
    pin_single_thread()  # only the engine thread computes with every core while it runs (server.threads)
    n = 2 if args.quick else args.prompts
    workloads = _workloads(AutoTokenizer.from_pretrained(default_model_dir()), n, 16 if args.quick else 128)
    with tempfile.TemporaryDirectory() as tmp:
        m32_store = Path(tmp)
        adapters = make_store(default_model_dir(), m32_store)
        rng = random.Random(0)
        count, out_len = (8, 8) if args.quick else (128, 64)
        m32 = [Job([rng.randrange(100, 250) for _ in range(64)], adapters[i % len(adapters)], out_len, True)
               for i in range(count)]  # fmt: skip
        results: dict = {}
        for label, spec in {"off": None, **methods}.items():
            settings = Settings(dtype=args.dtype, adapters_store=STORE, speculative_config=spec, max_loras=32)
            results[label] = run_engine(settings, workloads, [])
            results[label]["m32"] = []
        configs = list({"off": None, **methods}.items())
        for round_ in range(args.m32_rounds):
            for label, spec in configs if round_ % 2 == 0 else configs[::-1]:
                settings = Settings(dtype=args.dtype, adapters_store=m32_store, speculative_config=spec, max_loras=32)
                results[label]["m32"].append(run_engine(settings, {}, m32)["m32"])
    report(results, list(methods))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2, default=str))


def _workloads(tokenizer, n: int, chat_tokens: int) -> dict[str, tuple[list[Job], list[Job]]]:
    """(warm-up jobs, timed jobs) per workload; the warm-up's prompts are never the timed ones."""

    def task_jobs(name: str, max_tokens: int) -> tuple[list[Job], list[Job]]:
        examples = heldout(TASKS[name])
        jobs = [Job(chat_prompt(tokenizer, ex.prompt), name, max_tokens) for ex in examples[: 2 * n]]
        return jobs[n:], jobs[:n]

    m = min(n, len(CHATS), len(WARM_CHATS))
    chats = [Job(chat_prompt(tokenizer, text), None, chat_tokens) for text in (*WARM_CHATS[:m], *CHATS[:m])]
    workloads = {"json": task_jobs("json-extract", 40), "chat": (chats[:m], chats[m:])}
    for name, task in TASKS.items():
        if name != "json-extract" and (STORE / name).is_dir():
            workloads[f"accept-{name}"] = task_jobs(name, task.max_new_tokens)
    return workloads


def report(results: dict, methods: list[str]) -> None:
    off = results["off"]
    lines = []
    for method in methods:
        on = results[method]
        for name in ("json", "chat"):
            (out_off, tpot_off), (out_on, tpot_on) = off[name], on[name]
            same = "identical" if out_off == out_on else "DIFFERENT"
            lines.append(
                f"{method:6} {name:6} batch-1 TPOT {tpot_off:7.2f} ms -> {tpot_on:7.2f} ms "
                f"({tpot_off / tpot_on:5.2f}x), {same}"
            )
        ratios = [b / a for a, b in zip(off["m32"], on["m32"], strict=True)]
        rounds = ", ".join(f"{a:.1f} -> {b:.1f}" for a, b in zip(off["m32"], on["m32"], strict=True))
        lines.append(f"{method:6} m32    tok/s {rounds} (median ratio {statistics.median(ratios):5.2f}x)")
        for adapter, rate in sorted(on.get("acceptance", {}).items()):
            lines.append(f"{method:6} accept {adapter:20} {rate:6.1%}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
