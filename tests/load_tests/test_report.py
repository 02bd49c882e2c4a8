"""The report: vLLM's keys, per-adapter summaries, every request accounted as completed or failed."""

from __future__ import annotations

import asyncio

import pytest

from load_tests.client import RequestResult
from load_tests.report import build_report, percentile
from load_tests.runner import _accounted
from load_tests.workload import PlannedRequest

VLLM_KEYS = {
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
    "output_throughput", "total_token_throughput",
    *(f"{stat}_{kind}_ms" for stat in ("mean", "median", "std", "p99") for kind in ("ttft", "tpot", "itl", "e2el")),
}  # fmt: skip


def _ok(index: int, model: str, ttft: float, itls: list[float]) -> RequestResult:
    latency = ttft + sum(itls)
    return RequestResult(index, model, prompt_tokens=10, started=0.0, ok=True, ttft=ttft, latency=latency,
                         output_tokens=len(itls) + 1, itls=itls)  # fmt: skip


def test_report_has_vllm_keys_and_per_adapter_sections():
    results = [
        _ok(0, "a", 0.1, [0.01, 0.03]),
        _ok(1, "b", 0.3, [0.02]),
        RequestResult(2, "a", 10, 0.0, error="HTTP 429: queue full"),
    ]
    report = build_report(results, duration=2.0, config={"seed": 0})
    assert report.keys() >= VLLM_KEYS
    assert (report["completed"], report["failed"], report["num_requests"]) == (2, 1, 3)
    assert report["errors"] == {"HTTP 429: queue full": 1}
    assert report["total_output_tokens"] == 5 and report["output_throughput"] == 2.5
    assert report["mean_ttft_ms"] == pytest.approx(200)
    assert report["median_itl_ms"] == pytest.approx(20)
    assert report["mean_tpot_ms"] == pytest.approx((20 + 20) / 2)
    assert set(report["per_adapter"]) == {"a", "b"}
    assert report["per_adapter"]["a"]["failed"] == 1 and report["per_adapter"]["b"]["completed"] == 1
    assert VLLM_KEYS - {"duration"} <= report["per_adapter"]["a"].keys()


def test_a_request_whose_task_died_is_a_failure():
    request = PlannedRequest(3, 0.5, "a", [1, 2], 4)
    lost = _accounted(request, asyncio.CancelledError())
    assert not lost.ok and lost.error.startswith("lost: CancelledError")
    assert (lost.index, lost.model, lost.prompt_tokens) == (3, "a", 2)


def test_percentile_interpolates_like_numpy():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile([], 99) == 0.0
    assert percentile(list(range(101)), 99) == pytest.approx(99)
