"""The JSON report of a run, with vLLM's benchmark_serving keys (`mean_ttft_ms`, `p99_itl_ms`, ...) plus per-adapter.

Every planned request appears exactly once, as completed or failed (a request the generator lost track of is a
failure with a `lost:` error), so `completed + failed == num_requests` always holds.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

from load_tests.client import RequestResult

PERCENTILES = (50, 90, 95, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2el")


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default), 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_stats(name: str, seconds: Sequence[float]) -> dict[str, float]:
    """mean/median/std and percentiles of `seconds`, in milliseconds, under vLLM's key names."""
    ms = [s * 1000 for s in seconds]
    stats = {
        f"mean_{name}_ms": statistics.fmean(ms) if ms else 0.0,
        f"median_{name}_ms": statistics.median(ms) if ms else 0.0,
        f"std_{name}_ms": statistics.pstdev(ms) if ms else 0.0,
    }
    stats.update({f"p{p}_{name}_ms": percentile(ms, p) for p in PERCENTILES})
    return stats


def latencies(results: Sequence[RequestResult]) -> dict[str, list[float]]:
    """Seconds per latency kind over the completed requests (ITL: every gap of every request)."""
    done = [r for r in results if r.ok]
    return {
        "ttft": [r.ttft for r in done if r.ttft is not None],
        "tpot": [t for t in (r.tpot for r in done) if t is not None],
        "itl": [gap for r in done for gap in r.itls],
        "e2el": [r.latency for r in done if r.latency is not None],
    }


def summarize(results: Sequence[RequestResult], duration: float) -> dict[str, Any]:
    """Counts, throughputs and latency statistics of `results` over a run of `duration` seconds."""
    done = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    summary: dict[str, Any] = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration if duration > 0 else 0.0,
        "output_throughput": output_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration > 0 else 0.0,
    }
    for name, values in latencies(results).items():
        summary.update(latency_stats(name, values))
    return summary


def build_report(results: Sequence[RequestResult], duration: float, config: dict[str, Any]) -> dict[str, Any]:
    """The whole report: totals, errors by message, one summary per adapter (model name) and the run's config."""
    by_model: dict[str, list[RequestResult]] = {}
    for result in results:
        by_model.setdefault(result.model, []).append(result)
    errors = Counter(r.error for r in results if r.error is not None)
    return {
        "duration": duration,
        "num_requests": len(results),
        **summarize(results, duration),
        "errors": dict(errors.most_common()),
        "per_adapter": {model: summarize(group, duration) for model, group in sorted(by_model.items())},
        "config": config,
    }
