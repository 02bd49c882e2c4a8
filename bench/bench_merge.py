"""Merged mode on the default model, one run (issue: hot task switching).

1. Batch 1, 128 generated tokens: time per output token (TPOT) for the base model, adapter X merged, the same
   weights unmerged, and the base model while X is merged (it pays X's correction); the cases take turns for 5
   rounds, and each ratio is the median of the rounds' ratios (other processes share these 2 cores).
2. Merge + unmerge of X (r=8 on q_proj, v_proj) on the engine thread: switching between X and another adapter
   (every merge computes), back to back (the weights stay in the CPU's last-level cache, as in PEFT's own loop) and
   cold (after streaming more than that cache through the cores, as a step of a model larger than the cache does);
   merging X again while the buffers still hold it; the first merge, which allocates the buffers. PEFT's
   merge_adapter/unmerge_adapter back to back and cold, and merge_and_unload.
3. Batch 32 on one adapter (64 prompt tokens, 64 generated): throughput merged vs unmerged, best of 3 turns each.
4. Mixed: 32 concurrent clients, 96 requests (32 prompt tokens, 48 generated), 70 % on one adapter and the rest
   spread over 15 others; `auto` vs every adapter unmerged: throughput and p50/p99 TPOT over requests.
5. One batch-1 decode step of the model alone: base, X merged, X unmerged, 40 turns (case 1 without the noise).
Adapters are random PEFT adapters (r=8, q_proj and v_proj) written to a temporary store.

Usage: .venv/bin/python -m bench.bench_merge
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from bench.common import Request, decode_batch, paired_ratio, random_prompt, step_ms
from server.adapters.slots import attach_lora_slots, load_adapter_slot
from server.adapters.weights import ModelInfo, validate_adapter_dir
from server.engine.factory import build_engine
from server.engine.merge_controller import SwapRecord
from server.engine.sequence import SamplingParams
from server.model.default_model import default_model_dir
from server.model.kv_cache import KVCache
from server.model.loader import load_model
from server.model.merge import WeightMerger
from server.model.routing import make_lora_batch
from server.settings import Settings
from server.threads import pin_single_thread, use_engine_threads

LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
COLD = [f"cold{i}" for i in range(15)]
VOCAB = 49152


def make_adapters(base_dir: Path, root: Path) -> None:
    """x and x-copy (the same weights under a name that stays unmerged), hot and 15 cold adapters."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for seed, name in enumerate(["x", "hot", *COLD]):
        torch.manual_seed(seed)
        model = get_peft_model(base, LoraConfig(init_lora_weights=False, **LORA), adapter_name=name)
        model.save_pretrained(root, selected_adapters=[name])
        base = model.unload()
    (root / "x-copy").mkdir()
    for file in (root / "x").iterdir():
        (root / "x-copy" / file.name).write_bytes(file.read_bytes())


async def timed(engine, requests: list[Request], clients: int) -> tuple[float, int, list[float]]:
    """Run `requests` from `clients` concurrent clients; (seconds, generated tokens, TPOT of each request)."""
    queue = list(enumerate(requests))
    tpots: list[float] = []

    async def client() -> int:
        count = 0
        while queue:
            i, req = queue.pop(0)
            params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True)
            stamps = []
            async for out in engine.generate(req.prompt, params, req.adapter, f"bench-{i}-{time.monotonic()}"):
                stamps.extend([time.perf_counter()] * len(out.token_ids))
            tpots.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
            count += len(stamps)
        return count

    start = time.perf_counter()
    counts = await asyncio.gather(*[client() for _ in range(clients)])
    return time.perf_counter() - start, sum(counts), tpots


def run(engine, requests: list[Request], clients: int) -> tuple[float, int, list[float]]:
    return asyncio.run(timed(engine, requests, clients))


def unmerge(engine) -> None:
    asyncio.run(engine.call(lambda core: core.merger.unmerge()))


def batch1_tpot(engine, rounds: int = 5) -> dict[str, list[float]]:
    """TPOT (ms) of one 128-token request per case and round; the cases take turns, X is unmerged before each round."""
    rng = random.Random(1)
    cases: dict[str, list[float]] = {"base": [], "x unmerged": [], "x merged": [], "base, x merged": []}
    adapter = {"base": None, "x unmerged": "x-copy", "x merged": "x", "base, x merged": None}
    for _ in range(rounds):
        unmerge(engine)
        for case in cases:
            request = Request(random_prompt(rng, 32, VOCAB), 128, adapter[case])
            cases[case].append(1e3 * run(engine, [request], 1)[2][0])
    unmerge(engine)
    return cases


class CacheFlusher:
    """Streams more memory than the last-level cache holds through the cores, so the next reads come from DRAM."""

    def __init__(self, mib: int = 512) -> None:
        self.block = torch.ones(mib * 2**20 // 4)

    def __call__(self) -> None:
        self.block.mul_(1.0)


def swap_ms(engine, names: list[str], flush: CacheFlusher | None, repeats: int = 10) -> tuple[float, float]:
    """Median merge and unmerge time (ms) on the engine thread, merging `names` in turn, flushing before each."""
    keys = [asyncio.run(engine.adapters.acquire(name)) for name in names]

    def cycles(core) -> list[SwapRecord]:
        for i in range(repeats):
            if flush is not None:
                flush()
            core.merger.merge(keys[i % len(keys)])
            core.merger.unmerge()
        return list(core.merger.swaps)[-2 * repeats :]

    swaps = asyncio.run(engine.call(cycles))
    for key in keys:
        engine.adapters.release(key)
    merges = [1e3 * s.seconds for s in swaps if s.op == "merge"]
    unmerges = [1e3 * s.seconds for s in swaps if s.op == "unmerge"]
    return statistics.median(merges), statistics.median(unmerges)


def peft_swap_ms(model: PeftModel, flush: CacheFlusher | None, repeats: int = 10) -> tuple[float, float]:
    """PEFT's median merge_adapter and unmerge_adapter time (ms), flushing the cache before each."""
    merges, unmerges = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            if flush is not None:
                flush()
            start = time.perf_counter()
            model.merge_adapter()
            middle = time.perf_counter()
            model.unmerge_adapter()
            merges.append(1e3 * (middle - start))
            unmerges.append(1e3 * (time.perf_counter() - middle))
    return statistics.median(merges), statistics.median(unmerges)


def mixed_requests(n: int = 96, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    names = [rng.choice(COLD) if rng.random() >= 0.7 else "hot" for _ in range(n)]
    return [Request(random_prompt(rng, 32, VOCAB), 48, name) for name in names]


def throughput(engine, requests: list[Request], clients: int) -> tuple[float, float, float]:
    """(tokens/s, p50 TPOT ms, p99 TPOT ms)."""
    seconds, tokens, tpots = run(engine, requests, clients)
    ms = sorted(1e3 * t for t in tpots)
    return tokens / seconds, statistics.median(ms), ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]


Rows = list[tuple[str, str]]


def single_adapter_rows(engine) -> Rows:
    """Cases 1-3 on an engine where x is in merged mode and nothing is merged automatically."""
    run(engine, [Request(random_prompt(random.Random(9), 16, VOCAB), 8, name) for name in ("x-copy", None)], 2)
    tpot = batch1_tpot(engine)
    rows = [(f"batch 1 TPOT ms: {case} (median)", f"{statistics.median(ms):.2f}") for case, ms in tpot.items()]
    rows.append(("x merged / base (target <= 1.02)", f"{paired_ratio(tpot['x merged'], tpot['base']):.3f}"))
    rows.append(("x unmerged / base", f"{paired_ratio(tpot['x unmerged'], tpot['base']):.3f}"))
    rows.append(("base while x merged / base", f"{paired_ratio(tpot['base, x merged'], tpot['base']):.3f}"))
    rows += swap_rows(engine)
    batch = [Request(random_prompt(random.Random(i), 64, VOCAB), 64) for i in range(32)]
    best = {"unmerged": 0.0, "merged": 0.0}
    for _ in range(3):  # the cases take turns; each reports its best round
        for name, label in (("x-copy", "unmerged"), ("x", "merged")):
            tps, _, _ = throughput(engine, [Request(r.prompt, r.max_tokens, name) for r in batch], 32)
            best[label] = max(best[label], tps)
    rows += [(f"batch 32 tok/s: x {label}", f"{tps:.1f}") for label, tps in best.items()]
    rows.append(("batch 32 merged / unmerged", f"{best['merged'] / best['unmerged']:.3f}"))
    unmerge(engine)
    return rows


def swap_rows(engine) -> Rows:
    """Merge + unmerge of r=8 q,v adapters, switching between two (every merge computes) and re-merging one."""
    merger = engine.core.merger  # read here only while the engine thread is idle
    unmerge(engine)
    first = next(s.seconds for s in merger.swaps if s.op == "merge")  # batch1_tpot merged X: buffers allocated
    rows = [("first merge ms (allocates the buffers)", f"{1e3 * first:.1f}")]
    cases = (("switching, back to back", ["x", "hot"], None), ("switching, cold cache", ["x", "hot"], CacheFlusher()),
             ("same adapter again", ["x"], None))  # fmt: skip
    for label, names, flush in cases:
        merge_ms, unmerge_ms = swap_ms(engine, names, flush)
        rows.append((f"merge / unmerge ms, {label}", f"{merge_ms:.1f} / {unmerge_ms:.2f}"))
        rows.append((f"merge + unmerge ms, {label}", f"{merge_ms + unmerge_ms:.1f}"))
    rows.append(("merge buffers MiB", f"{merger.buffer_bytes / 2**20:.0f}"))
    return rows


def mixed_rows(label: str, engine) -> Rows:
    run(engine, [Request(random_prompt(random.Random(9), 16, VOCAB), 8, None)], 1)  # warm-up
    unmerge(engine)
    tps, p50, p99 = throughput(engine, mixed_requests(), 32)
    rows = [(f"mixed {label}: tok/s", f"{tps:.1f}"), (f"mixed {label}: TPOT p50 / p99 ms", f"{p50:.1f} / {p99:.1f}")]
    swaps = [f"{s.op} {s.adapter.split('@')[0]} {1e3 * s.seconds:.0f} ms" for s in engine.core.merger.swaps]
    if label == "auto":
        rows.append(("mixed auto: swaps", "; ".join(swaps) or "none"))
    return rows


def decode_step_rows(base_dir: Path, adapter: Path, rounds: int = 40) -> Rows:
    """One batch-1 decode step of the model alone (context 40), base vs X merged vs X unmerged, taking turns.

    The same comparison as case 1 without the request path around it, so that the ratios are not lost in the
    drift of this shared machine.
    """
    loaded = load_model(base_dir, torch.device("cpu"), torch.float32)
    attach_lora_slots(loaded.model, max_loras=1)
    updates = validate_adapter_dir(adapter, ModelInfo.from_model(loaded.model), max_lora_rank=64).updates
    load_adapter_slot(loaded.model, 0, updates)
    merger = WeightMerger(loaded.model.projections)
    cache = KVCache(loaded.spec, num_blocks=4, block_size=16, dtype=torch.float32, device="cpu")
    plain, with_x = decode_batch(1), decode_batch(1, [0])
    lora = make_lora_batch(with_x.adapter_slots)

    def steps(batch, lora_batch) -> float:
        return step_ms(loaded, batch, cache, lora_batch, repeats=3)

    times: dict[str, list[float]] = {"base": [], "x merged": [], "x unmerged": []}
    steps(plain, None)
    for _ in range(rounds):
        times["base"].append(steps(plain, None))
        merger.merge(updates)
        times["x merged"].append(steps(plain, None))  # X's tokens need no adapter work while it is merged
        merger.unmerge()
        times["x unmerged"].append(steps(with_x, lora))
    rows = [(f"decode step ms: {case} (median)", f"{statistics.median(ms):.2f}") for case, ms in times.items()]
    rows.append(("decode step x merged / base", f"{paired_ratio(times['x merged'], times['base']):.3f}"))
    rows.append(("decode step x unmerged / base", f"{paired_ratio(times['x unmerged'], times['base']):.3f}"))
    return rows


def peft_rows(base_dir: Path, adapter: Path) -> Rows:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter)
    rows = []
    for label, flush in (("back to back", None), ("cold cache", CacheFlusher())):
        merge, unmerge = peft_swap_ms(model, flush)
        rows.append((f"PEFT merge / unmerge ms, {label}", f"{merge:.1f} / {unmerge:.1f}"))
        rows.append((f"PEFT merge + unmerge ms, {label}", f"{merge + unmerge:.1f}"))
    start = time.perf_counter()
    with torch.inference_mode():
        model.merge_and_unload()
    rows.append(("PEFT merge_and_unload ms", f"{1e3 * (time.perf_counter() - start):.1f}"))
    return rows


def main() -> None:
    pin_single_thread()  # only the engine thread computes with every core while it runs (server.threads)
    torch.manual_seed(0)
    base_dir = default_model_dir()
    root = Path(tempfile.mkdtemp(prefix="bench-merge-"))
    make_adapters(base_dir, root)
    common = dict(adapters_store=root, max_num_seqs=64)
    rows: Rows = []
    engine = build_engine(Settings(merged=["x"], merge_window_s=3600, **common))  # no automatic swaps
    try:
        rows += single_adapter_rows(engine)
        rows += mixed_rows("all unmerged", engine)
    finally:
        engine.shutdown()
    engine = build_engine(Settings(auto_merge=["hot", *COLD], merge_window_s=0.5, **common))
    try:
        rows += mixed_rows("auto", engine)
    finally:
        engine.shutdown()
    use_engine_threads()  # the engines have stopped: the rest gets the cores they had
    rows += decode_step_rows(base_dir, root / "x")
    rows += peft_rows(base_dir, root / "x")
    for name, value in rows:
        print(f"{name:40} {value:>16}")


if __name__ == "__main__":
    main()
