"""`python -m load_tests --url http://127.0.0.1:8000 ...`: plan a load, run it, write report.json and PNG plots."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from load_tests.plots import plot_latency_cdfs, plot_throughput
from load_tests.report import build_report
from load_tests.runner import list_models, run
from load_tests.workload import LengthRange, Workload, plan


async def run_load(
    url: str, workload: Workload, models: list[str] | None = None, max_concurrency: int | None = None,
    timeout_s: float = 300.0, out_dir: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run `workload` against `url` over `models` (default: all it lists); write the report and plots to `out_dir`."""
    models = models or await list_models(url)
    requests = plan(workload, models)
    results, duration = await run(url, requests, max_concurrency, timeout_s)
    config = {
        "url": url,
        "models": models,
        "max_concurrency": max_concurrency,
        "timeout_s": timeout_s,
        **{k: str(v) if isinstance(v, float) and math.isinf(v) else v for k, v in _fields(workload).items()},
    }
    report = build_report(results, duration, config)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        plot_latency_cdfs(results, out_dir / "latency_cdfs.png")
        plot_throughput(results, duration, out_dir / "throughput.png")
    return report


def _fields(workload: Workload) -> dict[str, Any]:
    values = dataclasses.asdict(workload)
    for name in ("prompt_len", "output_len", "token_ids"):
        values[name] = f"{values[name]['low']}:{values[name]['high']}"
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m load_tests", description=__doc__)
    add = parser.add_argument
    add("--url", default="http://127.0.0.1:8000", help="server base URL (default: %(default)s)")
    add("--models", help="comma-separated model names to spread requests over (default: all of /v1/models)")
    add("--num-requests", type=int, default=100, help="requests to send (default: %(default)s)")
    add("--rate", type=float, default=math.inf, help="requests per second; inf sends all at once (default: inf)")
    add("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrivals; 1 = Poisson (default: 1)")
    add("--max-concurrency", type=int, help="most requests in flight at once (default: no cap)")
    add("--popularity", choices=["uniform", "zipf", "power"], default="uniform", help="adapter popularity law")
    add("--skew", type=float, default=1.0, help="Zipf's s or S-LoRA power's alpha (default: %(default)s)")
    add("--prompt-len", type=LengthRange.parse, default="32:256", help="prompt tokens, MIN:MAX (default: %(default)s)")
    add("--output-len", type=LengthRange.parse, default="16:128", help="output tokens, MIN:MAX (default: %(default)s)")
    add("--token-ids", type=LengthRange.parse, default="100:250", help="prompt token id range (default: %(default)s)")
    add("--seed", type=int, default=0, help="seed of the workload (default: %(default)s)")
    add("--timeout", type=float, default=300.0, help="seconds one request may take (default: %(default)s)")
    add("--out-dir", type=Path, default=Path("load_report"), help="report.json and plots go here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load; exit status 0 when every request completed, 1 when any failed."""
    args = build_parser().parse_args(argv)
    workload = Workload(
        num_requests=args.num_requests, rate=args.rate, burstiness=args.burstiness, popularity=args.popularity,
        skew=args.skew, prompt_len=args.prompt_len, output_len=args.output_len, token_ids=args.token_ids,
        seed=args.seed,
    )  # fmt: skip
    models = args.models.split(",") if args.models else None
    report = asyncio.run(run_load(args.url, workload, models, args.max_concurrency, args.timeout, args.out_dir))
    print(
        f"{report['completed']} completed, {report['failed']} failed in {report['duration']:.1f} s: "
        f"{report['request_throughput']:.2f} req/s, {report['output_throughput']:.1f} output tok/s, "
        f"median TTFT {report['median_ttft_ms']:.1f} ms, median ITL {report['median_itl_ms']:.1f} ms; "
        f"report in {args.out_dir}"
    )
    return 0 if report["failed"] == 0 else 1
