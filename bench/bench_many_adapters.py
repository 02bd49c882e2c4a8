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
  pairs     `--pairs` (8) closed-loop runs of Zipf and of the one adapter side by side (`--calibrate` requests each,
            which of the two goes first alternating): each pair's Zipf / one-adapter throughput and their median, the
            ratio with the shared machine's drift taken out (on this VM one workload's throughput moves 10-20 %
            between runs minutes apart); run first, after the warm-up
  single    output tokens/s of the Poisson workload with every request on one adapter, run before and after the mixed
            runs: their mean is the reference (a drift of the shared machine over the run cancels)
  zipf      the same requests over the store, popularity Zipf(`--skew`); and `uniform`
  ttft      p50 / p99 time to first token by where the request's adapter was when it was sent (disk, host memory,
            device slot), the share of each and cold p99 / hot p99 (issue: at most 3). The tier is the client's
            replay of the server's policy (least recently used, `--max-loras` slots, the host tier by bytes) over
            every request sent since the start: an estimate, exact for first uses
  memory    server RSS after the warm-up and after each run (issue: after the runs within 10 % of after the
            warm-up); the host tier's bytes (`/metrics`) against its budget
Warm-up: every adapter of the store once (`--warm-cycles`), one output token each, so both tiers are full and the
slot buffers at the largest rank (RSS `rss_store_warm_mib`), then one closed-loop run of the workload on the one
adapter and one of Zipf (`--calibrate` requests each), so the server has decoded at full batch before the first RSS
figure (`rss_warm_mib`: the single-token pass never decodes; the runs after it had shown 4-10 % more RSS that
rose and fell between runs rather than growing). Requests: `load_tests` (streamed completions of token-id prompts, EOS
ignored), Poisson arrivals. Each workload's rate is its own: the Poisson run arrives at `--load` (0.9) times the rate
the workload sustains in a closed loop at `--in-flight`, so TTFTs do not queue behind an overload while the machine
keeps the speed it had then: for the one adapter and Zipf the median over the pairs (one lucky closed-loop run on this
VM had set a rate the Zipf run could not keep), for uniform one closed-loop run of `--calibrate` requests. Each run
reports its mean requests in flight.
Timings only mean something on a quiet machine.

Usage: .venv/bin/python -m bench.bench_many_adapters [--adapters 1000] [--num-requests 512] [--out F.json]
Smoke: .venv/bin/python -m bench.bench_many_adapters --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
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
QUICK = {"adapters": 24, "distinct": 1, "num_requests": 24, "calibrate": 16, "in_flight": 8, "prompt_len": 8,
         "output_len": 8, "max_loras": 4, "max_cpu_lora_bytes": 32 << 20, "pairs": 2}  # fmt: skip


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


def tiers(history: list[str], requests: list[PlannedRequest], sizes: dict[str, int], slots: int,
          host_budget: int) -> list[str]:  # fmt: skip
    """Where each request's adapter was when it was sent, replaying the server's LRU tiers over the adapters
    `history` used before (in order) and then the requests in send order."""
    device: OrderedDict[str, None] = OrderedDict()
    host: OrderedDict[str, None] = OrderedDict()
    host_bytes = 0
    where = []
    order = sorted(range(len(requests)), key=lambda i: requests[i].send_at)
    for name in history + [requests[i].model for i in order]:
        where.append("device" if name in device else "host" if name in host else "disk")
        host_bytes += 0 if name in host else sizes[name]
        for tier in (device, host):
            tier[name] = None
            tier.move_to_end(name)
        while len(device) > slots:
            device.popitem(last=False)
        while host_bytes > host_budget and len(host) > 1:
            host_bytes -= sizes[host.popitem(last=False)[0]]
    by_index = dict(zip(order, where[len(history) :], strict=True))
    return [by_index[i] for i in range(len(requests))]


def ttft_by_tier(results: list[RequestResult], where: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for tier in ("disk", "host", "device"):
        ttfts = [r.ttft for r, w in zip(results, where, strict=True) if w == tier and r.ok and r.ttft is not None]
        out[tier] = {"share": len(ttfts) / len(results), "p50_ms": 1e3 * percentile(ttfts, 50) if ttfts else None,
                     "p99_ms": 1e3 * percentile(ttfts, 99) if ttfts else None}  # fmt: skip
    hot, cold = out["device"]["p99_ms"], out["disk"]["p99_ms"]
    out["cold_vs_hot_p99"] = cold / hot if hot and cold else None  # issue: at most 3
    return out


def mean_in_flight(results: list[RequestResult]) -> float:
    """Requests in flight on average over the run (Little's law: their summed latency over the run's span)."""
    done = [r for r in results if r.latency is not None]
    span = max(r.started + r.latency for r in done) - min(r.started for r in done)
    return sum(r.latency for r in done) / span


async def closed_loop(url: str, requests: list[PlannedRequest], in_flight: int, timeout_s: float) -> dict:
    """The load_tests report of `requests` all sent at once with `in_flight` at a time; raises on any failure."""
    at_once = [replace(r, send_at=0.0) for r in requests]
    return await load(url, at_once, in_flight, argparse.Namespace(timeout=timeout_s))


async def run_poisson(url: str, requests: list[PlannedRequest], in_flight: int, timeout_s: float) -> tuple[dict, list]:
    results, duration = await run(url, requests, 4 * in_flight, timeout_s)  # the cap only stops a runaway backlog
    report = build_report(results, duration, {})
    if report["failed"]:
        raise RuntimeError(f"{report['failed']} requests failed: {report['errors']}")
    return report | {"mean_in_flight": mean_in_flight(results)}, results


async def poisson(url: str, shape: Workload, names: list[str], rate: float, args: argparse.Namespace,
                  model: str | None = None) -> tuple[dict, list[PlannedRequest]]:  # fmt: skip
    """The workload's Poisson run arriving at `--load` times `rate` (requests/s the workload sustains in a closed
    loop), every request on `model` if given. Returns the run's report (with both rates and the results) and its
    requests."""
    offered = args.load * rate
    requests = [replace(r, model=model or r.model) for r in plan(replace(shape, rate=offered), names)]
    report, results = await run_poisson(url, requests, args.in_flight, args.timeout)
    return report | {"rate_req_s": offered, "closed_loop_req_s": rate, "results": results}, requests


async def warm_up(url: str, names: list[str], args: argparse.Namespace) -> list[str]:
    """Every adapter of the store, `--warm-cycles` times, one short request each: the tiers are full, the slot
    buffers at the largest rank (all ranks cycle through the store), every batch shape seen. The models sent."""
    sent = []
    for cycle in range(args.warm_cycles):
        shape = Workload(len(names), prompt_len=LengthRange(args.prompt_len, args.prompt_len),
                         output_len=LengthRange(1, 1), seed=args.seed + 2000 + cycle)  # fmt: skip
        requests = [replace(r, model=name) for r, name in zip(plan(shape, names), names, strict=True)]
        await closed_loop(url, requests, args.in_flight, args.timeout)
        sent += names
    return sent


async def workloads(url: str, sizes: dict[str, int], rss: Callable[[], float], args: argparse.Namespace) -> dict:
    """The warm-up; the side-by-side pairs, whose median closed-loop rates set the single and Zipf Poisson rates; a
    closed-loop run of uniform for its rate; then the single, Zipf, uniform and again the single Poisson run."""
    names = sorted(sizes)
    history = await warm_up(url, names, args)
    out: dict = {"rss_store_warm_mib": rss()}
    fixed = {"prompt_len": LengthRange(args.prompt_len, args.prompt_len),
             "output_len": LengthRange(args.output_len, args.output_len)}  # fmt: skip
    shape = Workload(args.num_requests, popularity="zipf", skew=args.skew, seed=args.seed, **fixed)
    hot = names[0]  # Zipf's most popular adapter: the single-adapter reference runs on it
    steady = plan(replace(shape, num_requests=args.calibrate, seed=args.seed + 4000), names)
    for requests in ([replace(r, model=hot) for r in steady], steady):  # decoding at full batch, one and many adapters
        await closed_loop(url, requests, args.in_flight, args.timeout)
        history += [r.model for r in requests]
    out["rss_warm_mib"] = rss()
    out["pairs"], sent = await pairs(url, shape, names, hot, args)
    history += sent
    uniform = replace(shape, popularity="uniform", seed=args.seed + 1)
    calibration = plan(replace(uniform, num_requests=args.calibrate, seed=uniform.seed + 1000), names)
    closed = await closed_loop(url, calibration, args.in_flight, args.timeout)
    rates = {"single": out["pairs"]["single_req_s"], "zipf": out["pairs"]["zipf_req_s"],
             "uniform": closed["request_throughput"]}  # fmt: skip
    history += [r.model for r in calibration]
    single, _ = await poisson(url, shape, names, rates["single"], args, model=hot)
    history += [hot] * args.num_requests
    out["single"] = _summary(single) | {"rss_mib": rss()}
    for workload in (replace(shape, seed=args.seed + 1), uniform):
        report, requests = await poisson(url, workload, names, rates[workload.popularity], args)
        where = tiers(history, requests, sizes, args.max_loras, args.max_cpu_lora_bytes)
        history += [r.model for r in sorted(requests, key=lambda r: r.send_at)]
        out[workload.popularity] = _summary(report) | {
            "distinct_adapters": len({r.model for r in requests}),
            "ttft": ttft_by_tier(report["results"], where),
            "rss_mib": rss(),  # after each run: growth that stops after the first is a one-off, not a leak
        }
    again, _ = await poisson(url, shape, names, rates["single"], args, model=hot)
    out["single_after"] = _summary(again) | {"rss_mib": rss()}
    reference = (single["output_throughput"] + again["output_throughput"]) / 2
    for popularity in ("zipf", "uniform"):
        out[popularity]["vs_single"] = out[popularity]["tok_s"] / reference  # issue: at least 0.9 for 1,000 Zipf
    return out


async def pairs(url: str, shape: Workload, names: list[str], hot: str,
                args: argparse.Namespace) -> tuple[dict, list[str]]:  # fmt: skip
    """Zipf against the one adapter in adjacent closed-loop runs of the same prompts, the single run first in even
    pairs and last in odd ones: each pair's throughputs and their ratio, the median ratio and each workload's median
    request rate. Also returns the models sent, in order."""
    ratios, tok_s, req_s, sent = [], [], {"single": [], "zipf": []}, []
    for i in range(args.pairs):
        zipf = plan(replace(shape, num_requests=args.calibrate, seed=shape.seed + 3000 + i), names)
        runs = {"single": [replace(r, model=hot) for r in zipf], "zipf": zipf}
        pair = {}
        for name in ("single", "zipf") if i % 2 == 0 else ("zipf", "single"):
            report = await closed_loop(url, runs[name], args.in_flight, args.timeout)
            pair[name] = report["output_throughput"]
            req_s[name].append(report["request_throughput"])
            sent += [r.model for r in runs[name]]
        ratios.append(pair["zipf"] / pair["single"])
        tok_s.append(pair)
    medians = {f"{name}_req_s": statistics.median(rates) for name, rates in req_s.items()}
    return {"tok_s": tok_s, "ratios": ratios, "median": statistics.median(ratios)} | medians, sent


def _summary(report: dict) -> dict:
    keys = ("output_throughput", "rate_req_s", "closed_loop_req_s", "mean_in_flight")
    return {"tok_s" if k == "output_throughput" else k: report[k] for k in keys}


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
        result["rss_growth"] = result["rss_after_mib"] / result["rss_warm_mib"] - 1  # issue: at most 0.10
        result["rss_growth_since_store_warm"] = result["rss_after_mib"] / result["rss_store_warm_mib"] - 1
        result |= tier_bytes(url) | {"host_budget_bytes": args.max_cpu_lora_bytes}
        result["host_within_budget"] = result["host_tier_bytes"] <= args.max_cpu_lora_bytes
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
    parser.add_argument("--calibrate", type=int, default=128, help="requests of each workload's closed-loop run")
    parser.add_argument("--pairs", type=int, default=8, help="side-by-side closed-loop Zipf / one-adapter runs")
    parser.add_argument("--load", type=float, default=0.9, help="Poisson rate as a fraction of the closed-loop rate")
    parser.add_argument("--warm-cycles", type=int, default=1, help="passes over the whole store before the runs")
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
    parser.add_argument("--quick", action="store_true", help="a smoke run of a minute: a small store, short runs")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be at least 1: the pairs' closed-loop rates set the Poisson rates")
    if args.quick:
        args = argparse.Namespace(**(vars(args) | QUICK))
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
