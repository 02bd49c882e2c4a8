"""Thousands of adapters on one server (issue #28): Zipf and uniform traffic over a generated store, against the
same workload on one adapter.

The store: `--adapters` LoRA adapters (default 1,000; issue: 1,000 and 5,000) for the default model on q, k, v, o,
ranks cycling through 8, 16, 32, 64 (sizes mixed), written straight as safetensors (`bench.real_shapes`). To keep
5,000 of them on a small disk, `--distinct` random weight files are drawn per rank and the other adapters
hard-link one of them: each adapter is still its own folder, read and checked on its own (from the page cache once
read, so "disk" here is the page cache, not the device; drop caches for cold-disk figures).

Measured, one loraplex server at a time (bf16, `--max-cpu-lora-bytes` as given):
  start-up  seconds to a healthy server over the store, and over an empty store (issue: at most 3 s more)
  models    median time of `GET /v1/models` listing the whole store (issue: at most 100 ms)
  single    output tokens/s of the workload with every request on one adapter (the reference)
  zipf      the same requests over the store, popularity Zipf(`--skew`); and `uniform`
  ttft      p50 / p99 time to first token by where the request's adapter was when it was sent (disk, host memory,
            device slot) and the share of each. The tier is the client's replay of the server's policy (least
            recently used, `--max-loras` slots, the host tier by bytes): an estimate, exact for first uses
  memory    server RSS after the warm-up and after the runs; the host tier's bytes (`/metrics`) vs its budget
Requests: `load_tests` (streamed completions of token-id prompts, EOS ignored), Poisson arrivals at the rate that
keeps `--in-flight` requests in flight on the single-adapter run (calibrated first with that many in flight).
Timings only mean something on a quiet machine.

Usage: .venv/bin/python -m bench.bench_many_adapters [--adapters 1000] [--num-requests 512] [--out F.json]
Smoke: .venv/bin/python -m bench.bench_many_adapters --adapters 50 --num-requests 20 --output-len 8 --prompt-len 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import httpx

from bench.bench_vs_vllm import Server, free_port, load, start, stop, tree_memory
from bench.real_shapes import make_lora_store
from load_tests.client import RequestResult
from load_tests.readiness import wait_until_ok
from load_tests.report import build_report, percentile
from load_tests.runner import run
from load_tests.workload import LengthRange, PlannedRequest, Workload, plan
from server.model.default_model import default_model_dir

RANKS = (8, 16, 32, 64)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
WEIGHTS = "adapter_model.safetensors"
SERVER = Server("loraplex-bf16", "loraplex", "bfloat16")


def make_store(model_dir: Path, root: Path, count: int, distinct: int) -> dict[str, int]:
    """`count` adapters named `ad00000`...; returns each one's weights size in bytes."""
    sources = {rank: make_lora_store(model_dir, root / f"_src-r{rank}", distinct, rank, TARGETS) for rank in RANKS}
    sizes = {}
    for i in range(count):
        rank = RANKS[i % len(RANKS)]
        source = root / f"_src-r{rank}" / sources[rank][(i // len(RANKS)) % distinct]
        folder = root / f"ad{i:05d}"
        folder.mkdir()
        os.link(source / WEIGHTS, folder / WEIGHTS)
        shutil.copy(source / "adapter_config.json", folder / "adapter_config.json")
        sizes[folder.name] = (folder / WEIGHTS).stat().st_size
    return sizes


def serve(server: Server, model_dir: Path, store: Path, log: Path, timeout_s: float) -> tuple[object, str, float]:
    """Start a server over `store`; the process, its URL and the seconds it took to answer /health."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    began = time.monotonic()
    proc = start(server, model_dir, store, port, log, shaped=False)
    wait_until_ok(f"{url}/health", timeout_s, alive=proc.is_running, poll_s=0.05)
    return proc, url, time.monotonic() - began


def list_ms(url: str, times: int = 5) -> float:
    """Median milliseconds of GET /v1/models."""
    spent = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(times):
            began = time.perf_counter()
            client.get("/v1/models").raise_for_status()
            spent.append(1e3 * (time.perf_counter() - began))
    return sorted(spent)[len(spent) // 2]


def tier_bytes(url: str) -> dict[str, float]:
    """Bytes of each tier (`/metrics`); the host tier's budget bounds the entries not also in a device slot."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    found = dict(re.findall(r'^loraplex_adapter_tier_bytes\{tier="(\w+)"\} (\S+)$', text, re.MULTILINE))
    host, device = float(found.get("host", "nan")), float(found.get("device", "nan"))
    return {"host_tier_bytes": host, "device_tier_bytes": device, "host_only_bytes": host - device}


def tiers(requests: list[PlannedRequest], sizes: dict[str, int], slots: int, host_budget: int) -> list[str]:
    """Where each request's adapter was when it was sent, replaying the server's LRU tiers in send order."""
    device: OrderedDict[str, None] = OrderedDict()
    host: OrderedDict[str, None] = OrderedDict()
    where = []
    for request in sorted(requests, key=lambda r: r.send_at):
        name = request.model
        where.append("device" if name in device else "host" if name in host else "disk")
        for tier in (device, host):
            tier[name] = None
            tier.move_to_end(name)
        while len(device) > slots:
            device.popitem(last=False)
        while sum(sizes[n] for n in host) > host_budget and len(host) > 1:
            host.popitem(last=False)
    order = sorted(range(len(requests)), key=lambda i: requests[i].send_at)
    by_index = dict(zip(order, where, strict=True))
    return [by_index[i] for i in range(len(requests))]


def ttft_by_tier(results: list[RequestResult], where: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for tier in ("disk", "host", "device"):
        ttfts = [r.ttft for r, w in zip(results, where, strict=True) if w == tier and r.ok and r.ttft is not None]
        out[tier] = {"share": len(ttfts) / len(results), "p50_ms": 1e3 * percentile(ttfts, 50) if ttfts else None,
                     "p99_ms": 1e3 * percentile(ttfts, 99) if ttfts else None}  # fmt: skip
    return out


async def run_poisson(url: str, requests: list[PlannedRequest], in_flight: int, timeout_s: float) -> tuple[dict, list]:
    results, duration = await run(url, requests, 4 * in_flight, timeout_s)  # the cap only stops a runaway backlog
    report = build_report(results, duration, {})
    if report["failed"]:
        raise RuntimeError(f"{report['failed']} requests failed: {report['errors']}")
    return report, results


async def workloads(url: str, sizes: dict[str, int], rss: Callable[[], float], args: argparse.Namespace) -> dict:
    """The calibration (also the warm-up: every batch shape of the runs), then the single, Zipf, uniform runs."""
    names = sorted(sizes)
    fixed = {"prompt_len": LengthRange(args.prompt_len, args.prompt_len),
             "output_len": LengthRange(args.output_len, args.output_len)}  # fmt: skip
    shape = Workload(args.num_requests, popularity="zipf", skew=args.skew, seed=args.seed, **fixed)
    hot = names[0]  # Zipf's most popular adapter: the single-adapter reference runs on it
    # One request per rank first: device slot buffers grow once to the largest rank served (bounded by
    # --max-loras x --max-lora-rank), which belongs in the warm-up, not in the runs' memory growth.
    by_rank = [replace(r, send_at=0.0, model=names[i]) for i, r in enumerate(plan(shape, names)[: len(RANKS)])]
    await load(url, by_rank, len(RANKS), argparse.Namespace(timeout=args.timeout))
    calibrate = [replace(r, send_at=0.0, model=hot) for r in plan(shape, names)]
    closed = await load(url, calibrate, args.in_flight, argparse.Namespace(timeout=args.timeout))
    rate = closed["request_throughput"]  # requests/s that keep `in_flight` busy
    out: dict = {"rate_req_s": rate, "calibration_tok_s": closed["output_throughput"], "rss_warm_mib": rss()}
    zipf = plan(replace(shape, rate=rate), names)
    single, _ = await run_poisson(url, [replace(r, model=hot) for r in zipf], args.in_flight, args.timeout)
    out["single_tok_s"], out["single_rss_mib"] = single["output_throughput"], rss()
    for popularity in ("zipf", "uniform"):
        requests = plan(replace(shape, rate=rate, popularity=popularity, seed=args.seed + 1), names)
        where = tiers(requests, sizes, args.max_loras, args.max_cpu_lora_bytes)
        report, results = await run_poisson(url, requests, args.in_flight, args.timeout)
        tok_s = report["output_throughput"]
        out[popularity] = {
            "tok_s": tok_s,
            "vs_single": tok_s / out["single_tok_s"],
            "distinct_adapters": len({r.model for r in requests}),
            "ttft": ttft_by_tier(results, where),
            "rss_mib": rss(),  # after each run: growth that stops after the first is a one-off, not a leak
        }
    return out


def measure(model_dir: Path, store: Path, empty: Path, sizes: dict[str, int], args: argparse.Namespace) -> dict:
    flags = (
        "--max-cpu-lora-bytes",
        str(args.max_cpu_lora_bytes),
        "--max-loras",
        str(args.max_loras),
        "--max-cpu-loras",
        str(max(len(sizes), args.max_loras)),
    )  # the host tier is bounded by bytes alone
    server = replace(SERVER, flags=flags)
    proc, _, empty_start_s = serve(server, model_dir, empty, args.log_dir / "empty.log", args.start_timeout)
    stop(proc)
    proc, url, start_s = serve(server, model_dir, store, args.log_dir / "store.log", args.start_timeout)
    try:
        result = {"start_s": start_s, "empty_start_s": empty_start_s, "models_ms": list_ms(url)}
        result |= asyncio.run(workloads(url, sizes, lambda: tree_memory(proc)["rss_mib"], args))
        result["rss_after_mib"] = tree_memory(proc)["rss_mib"]
        result["rss_growth"] = result["rss_after_mib"] / result["rss_warm_mib"] - 1
        result |= tier_bytes(url) | {"host_budget_bytes": args.max_cpu_lora_bytes}
    finally:
        stop(proc)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--distinct", type=int, default=16, help="random weight files per rank; the rest hard-link")
    parser.add_argument("--store", type=Path, help="build (or reuse, if it exists) the store here; default: a temp dir")
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--skew", type=float, default=1.0)
    parser.add_argument("--max-loras", type=int, default=32)
    parser.add_argument("--max-cpu-lora-bytes", type=int, default=2**30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    model_dir = default_model_dir()
    with tempfile.TemporaryDirectory(prefix="many-adapters-") as tmp:
        store = args.store or Path(tmp) / "store"
        if not store.exists():
            store.mkdir(parents=True)
            make_store(model_dir, store, args.adapters, args.distinct)
        sizes = {p.name: (p / WEIGHTS).stat().st_size for p in store.iterdir() if not p.name.startswith("_")}
        (Path(tmp) / "empty").mkdir()
        result = {"adapters": len(sizes), **measure(model_dir, store, Path(tmp) / "empty", sizes, args)}
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
