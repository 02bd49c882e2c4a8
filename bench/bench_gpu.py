"""The GPU benchmark of issue #26, run by `bench/gpu_check.sh` on a lent GPU: one call, partial results kept.

On a random-weight checkpoint with Llama-3.2-1B's published shape (built on the machine from `bench.real_shapes`'
config; no download) and rank-16 LoRA adapters on every projection, 64-token prompts and 128-token outputs:

- kernels: the Triton LoRA and decode-attention kernels against the torch reference at the model's shapes, and
  their time next to the torch ops';
- our engine: base-only throughput at 64 and 256 in flight; 256 in flight over 32 and 128 distinct adapters with
  uniform and Zipf popularity; batch-1 time per output token (TPOT) for the base, an unmerged adapter and a merged
  one (eager: CUDA graphs are not built yet);
- HF PEFT serving the same adapters one request at a time (S-LoRA's comparison) and transformers' `generate` for
  the base, on the same GPU.

Every figure is appended to OUT/bench.json as it is measured, with its targets; a section that fails or finds too
little time left is recorded as such and the rest still runs.

Usage: python -m bench.bench_gpu OUT_DIR [--budget-s 330] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import Request, engine_throughput, random_prompt
from bench.real_shapes import make_checkpoint, make_lora_store

PROMPT, OUT, RANK = 64, 128, 16
VOCAB = 49152  # the default model's tokenizer, whose ids the checkpoint's embeddings keep
DEVICE = "cuda"  # a smoke run on CPU sets "cpu"


class Report:
    """Figures as they come, saved after each one so a timed-out run keeps what it measured."""

    def __init__(self, path: Path, budget_s: float) -> None:
        self.path, self.deadline = path, time.monotonic() + budget_s
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (a CPU smoke run)"
        self.data: dict[str, object] = {"gpu": gpu, "torch": torch.__version__}

    def put(self, name: str, value: object) -> None:
        self.data[name] = value
        self.path.write_text(json.dumps(self.data, indent=1))
        print(f"{name:44} {value}", flush=True)

    def section(self, name: str, need_s: float, fn: Callable[[], None]) -> None:
        """Run `fn` if `need_s` seconds are left; a failure is recorded and the next section runs."""
        left = self.deadline - time.monotonic()
        if left < need_s:
            self.put(f"{name}.skipped", f"{left:.0f} s left, needs ~{need_s:.0f}")
            return
        start = time.monotonic()
        try:
            fn()
        except Exception:  # one broken section must not lose the others' figures
            self.put(f"{name}.error", traceback.format_exc(limit=6))
        self.put(f"{name}.seconds", round(time.monotonic() - start, 1))


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def workload(adapters: list[str | None], n: int, popularity: str, seed: int = 0) -> list[Request]:
    """`n` requests over `adapters`, uniform or Zipf (s = 1) popularity."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(len(adapters))] if popularity == "zipf" else None
    picks = rng.choices(adapters, weights=weights, k=n)
    return [Request(random_prompt(rng, PROMPT, VOCAB), OUT, a) for a in picks]


async def _tpot_ms(engine, adapter: str | None) -> float:
    """Batch-1 time per output token after the first, in ms."""
    from server.engine.sequence import SamplingParams

    params = SamplingParams(max_tokens=OUT, temperature=0.0, ignore_eos=True)
    prompt = random_prompt(random.Random(7), PROMPT, VOCAB)
    first = end = None
    count = 0
    async for out in engine.generate(prompt, params, adapter, f"tpot-{adapter}-{time.monotonic()}"):
        now = time.perf_counter()
        first = first or now
        end, count = now, count + len(out.token_ids)
    return 1e3 * (end - first) / max(count - 1, 1)


def _engine(model_dir: Path, store: Path, max_loras: int, merged: list[str] | None = None):
    from server.engine.factory import build_engine
    from server.settings import Settings

    settings = Settings(
        model=model_dir, adapters_store=store, device=DEVICE, dtype="bfloat16", max_loras=max_loras,
        max_cpu_loras=max_loras + 8, max_num_seqs=256, kv_cache_bytes=16 * 2**30, merged=merged or [],
    )  # fmt: skip
    return build_engine(settings)


def bench_engine(report: Report, model_dir: Path, store: Path, names: list[str], quick: bool) -> None:
    n = 32 if quick else 256
    engine = _engine(model_dir, store, max_loras=len(names))
    try:
        rng = random.Random(9)  # warm-up: compiles the kernels and makes every adapter resident, as on a busy server
        engine_throughput(engine, [Request(random_prompt(rng, PROMPT, VOCAB), 8, a) for a in [None, *names]])
        base = {}
        for inflight in (64, n):
            base[inflight] = engine_throughput(engine, workload([None], inflight, "uniform", seed=inflight))
            report.put(f"engine.base.{inflight}_in_flight.tok_s", round(base[inflight], 1))
        for count in (32, len(names)):
            for popularity in ("uniform", "zipf"):
                tok_s = engine_throughput(engine, workload(names[:count], n, popularity, seed=count))
                report.put(f"engine.{count}_adapters.{popularity}.tok_s", round(tok_s, 1))
                target = 0.9 if count == 32 else 0.85
                report.put(
                    f"engine.{count}_adapters.{popularity}.vs_base (target >= {target})", round(tok_s / base[n], 3)
                )
        for label, adapter in (("base", None), ("unmerged", names[0])):
            report.put(
                f"engine.tpot_ms.{label} (target <= 4 with graphs)", round(asyncio.run(_tpot_ms(engine, adapter)), 3)
            )
    finally:
        engine.shutdown()


def bench_merged(report: Report, model_dir: Path, store: Path, names: list[str]) -> None:
    engine = _engine(model_dir, store, max_loras=4, merged=[names[0]])
    try:
        asyncio.run(_tpot_ms(engine, names[0]))  # warm-up; the merge happens meanwhile
        time.sleep(2.0)
        report.put("engine.tpot_ms.merged (target = base within 2%)", round(asyncio.run(_tpot_ms(engine, names[0])), 3))
    finally:
        engine.shutdown()


def bench_peft(report: Report, model_dir: Path, store: Path, names: list[str], quick: bool) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(DEVICE).eval()
    reqs = workload([None], 8 if quick else 64, "uniform", seed=1)
    _sync()
    start = time.perf_counter()
    ids = torch.tensor([r.prompt for r in reqs], device=DEVICE)
    with torch.inference_mode():
        base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=OUT, min_new_tokens=OUT,
                      do_sample=False)  # fmt: skip
    _sync()
    report.put(f"hf.generate.base.{len(reqs)}_batch.tok_s", round(len(reqs) * OUT / (time.perf_counter() - start), 1))
    served = names[:8]
    peft = PeftModel.from_pretrained(base, store / served[0], adapter_name=served[0])
    for name in served[1:]:
        peft.load_adapter(store / name, adapter_name=name)
    peft.eval()
    reqs = workload(served, 4 if quick else 16, "uniform", seed=2)
    _sync()
    start = time.perf_counter()
    for r in reqs:
        peft.set_adapter(r.adapter)
        ids = torch.tensor([r.prompt], device=DEVICE)
        with torch.inference_mode():
            peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=OUT, min_new_tokens=OUT,
                          do_sample=False)  # fmt: skip
    _sync()
    tok_s = len(reqs) * OUT / (time.perf_counter() - start)
    report.put("peft.one_at_a_time.tok_s", round(tok_s, 1))
    ours = report.data.get("engine.32_adapters.uniform.tok_s")
    if isinstance(ours, float):
        report.put("engine.32_adapters / peft (target >= 30)", round(ours / tok_s, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--budget-s", type=float, default=330.0, help="stop starting sections after this")
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out / "bench.json", args.budget_s)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    model_dir, store = work / "llama3.2-1b", work / "adapters"
    names: list[str] = []

    def build() -> None:
        make_checkpoint("llama3.2-1b", model_dir)
        names.extend(make_lora_store(model_dir, store, 32 if args.quick else 128, RANK))

    report.section("build", 20, build)
    if not names:
        return
    from bench.gpu_kernels import bench_kernels

    report.section("kernels", 30, lambda: bench_kernels(report.put, model_dir, torch.device(DEVICE)))
    report.section("engine", 120, lambda: bench_engine(report, model_dir, store, names, args.quick))
    report.section("merged", 30, lambda: bench_merged(report, model_dir, store, names))
    report.section("peft", 40, lambda: bench_peft(report, model_dir, store, names, args.quick))


if __name__ == "__main__":
    main()
