"""The metrics module on its own: names, types and labels, the adapter label cap, request timing, gauges."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import OTHER, AdapterLabels, Metrics, RequestTrace


@pytest.fixture
def metrics() -> Metrics:
    metrics = Metrics(max_adapters=2, max_loras=4)
    metrics.set_base_model("base")
    return metrics


def families(metrics: Metrics) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(metrics.render().decode())}


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def finished_trace(prompt: int = 5, tokens: int = 3, reason: str = "length") -> RequestTrace:
    trace = RequestTrace(prompt)
    for i in range(tokens):
        trace.on_output(1, trace.submitted + 0.001, reason if i == tokens - 1 else None)
    return trace


def test_collectors_have_prometheus_names_and_types(metrics):
    metrics.record_request("base", finished_trace())
    metrics.record_http_error(404)
    expected = {
        "loraplex_time_to_first_token_seconds": "histogram",
        "loraplex_inter_token_latency_seconds": "histogram",
        "loraplex_e2e_request_latency_seconds": "histogram",
        "loraplex_request_queue_time_seconds": "histogram",
        "loraplex_request_prompt_tokens": "histogram",
        "loraplex_request_generation_tokens": "histogram",
        "loraplex_prompt_tokens": "counter",
        "loraplex_generation_tokens": "counter",
        "loraplex_requests": "counter",
        "loraplex_request_errors": "counter",
        "loraplex_prefix_cache_queries": "counter",
        "loraplex_prefix_cache_hits": "counter",
        "loraplex_num_requests_running": "gauge",
        "loraplex_num_requests_waiting": "gauge",
        "loraplex_kv_cache_usage_ratio": "gauge",
        "loraplex_engine_step_seconds": "histogram",
        "loraplex_engine_step_batch_tokens": "histogram",
        "loraplex_engine_step_failures": "counter",
        "loraplex_engine_request_failures": "counter",
        "loraplex_adapter_slot_users": "gauge",
        "loraplex_lora_requests_info": "gauge",
        "loraplex_adapter_cache_events": "counter",
        "loraplex_adapters_resident": "gauge",
        "loraplex_adapter_host_bytes": "gauge",
        "loraplex_merged_adapter": "gauge",
        "loraplex_adapter_merge_swaps": "counter",
        "loraplex_adapter_load_seconds": "histogram",
        "loraplex_adapter_merge_seconds": "histogram",
        "loraplex_adapter_loads": "counter",
        "loraplex_adapter_tier_load_seconds": "histogram",
        "loraplex_adapter_tier_bytes": "gauge",
        "loraplex_adapter_prefetch_hits": "counter",
        "loraplex_spec_decode_num_draft_tokens": "counter",
        "loraplex_spec_decode_num_accepted_tokens": "counter",
        "loraplex_tenant_requests": "counter",
        "loraplex_tenant_generation_tokens": "counter",
        "loraplex_tenant_refusals": "counter",
    }
    assert families(metrics) == expected
    assert "loraplex_requests_total{" in metrics.render().decode()


def test_a_request_is_recorded_under_its_adapter(metrics):
    metrics.record_request("base", finished_trace(prompt=7, tokens=4))
    assert value(metrics, "loraplex_requests_total", adapter="base", finish_reason="length") == 1
    assert value(metrics, "loraplex_prompt_tokens_total", adapter="base") == 7
    assert value(metrics, "loraplex_generation_tokens_total", adapter="base") == 4
    assert value(metrics, "loraplex_time_to_first_token_seconds_count", adapter="base") == 1
    assert value(metrics, "loraplex_inter_token_latency_seconds_count", adapter="base") == 3
    assert value(metrics, "loraplex_request_queue_time_seconds_count", adapter="base") == 1
    assert value(metrics, "loraplex_e2e_request_latency_seconds_count", adapter="base") == 1
    assert value(metrics, "loraplex_request_generation_tokens_sum", adapter="base") == 4


def test_a_cancelled_request_counts_without_latency():
    metrics = Metrics(max_adapters=2, max_loras=4)
    trace = RequestTrace(3)
    trace.on_output(1, trace.submitted, None)
    metrics.record_request("a", trace)
    assert value(metrics, "loraplex_requests_total", adapter="a", finish_reason="cancelled") == 1
    assert value(metrics, "loraplex_generation_tokens_total", adapter="a") == 1
    assert value(metrics, "loraplex_e2e_request_latency_seconds_count", adapter="a") is None
    assert value(metrics, "loraplex_request_generation_tokens_count", adapter="a") is None


def test_prefix_cache_queries_and_hits_count_prompt_tokens_of_admitted_requests(metrics):
    hit = finished_trace(prompt=20)
    hit.num_cached_tokens = 16
    never_scheduled = RequestTrace(9)  # cancelled while waiting: its prompt was never looked up
    for trace in (hit, finished_trace(prompt=7), never_scheduled):
        metrics.record_request("a", trace)
    assert value(metrics, "loraplex_prefix_cache_queries_total", adapter="a") == 27
    assert value(metrics, "loraplex_prefix_cache_hits_total", adapter="a") == 16


def test_adapter_label_is_capped_and_the_base_model_keeps_its_own(metrics):
    for name in ("a", "b", "c", "d"):
        metrics.record_request(name, finished_trace())
    metrics.record_request("base", finished_trace())
    labels = {
        s.labels["adapter"]
        for f in text_string_to_metric_families(metrics.render().decode())
        if f.name == "loraplex_requests"
        for s in f.samples
    }
    assert labels == {"a", "b", OTHER, "base"}
    assert value(metrics, "loraplex_requests_total", adapter=OTHER, finish_reason="length") == 2


def test_adapter_labels_stay_stable():
    labels = AdapterLabels(limit=1)
    labels.reserve("base")
    assert [labels(n) for n in ("x", "y", "x", "base", "y")] == ["x", OTHER, "x", "base", OTHER]


def test_request_trace_times_tokens_and_scheduling():
    trace = RequestTrace(4)
    scheduled = trace.submitted + 0.5
    trace.on_output(1, scheduled, None)
    time.sleep(0.01)
    trace.on_output(2, None, "stop")
    assert trace.scheduled == scheduled
    assert trace.first_token is not None and trace.last_token is not None and trace.last_token > trace.first_token
    assert trace.num_generation_tokens == 3
    assert len(trace.inter_token_latencies) == 1
    assert trace.inter_token_latencies[0] == pytest.approx((trace.last_token - trace.first_token) / 2)
    assert trace.finish_reason == "stop" and trace.ended == trace.last_token


def test_scheduler_state_keeps_one_lora_info_series(metrics):
    metrics.record_scheduler_state(2, 1, 0.25, ["b", "a"], ["c"])
    metrics.record_scheduler_state(1, 0, 0.125, ["a"], [])
    text = metrics.render().decode()
    info = [line for line in text.splitlines() if line.startswith("loraplex_lora_requests_info{")]
    assert len(info) == 1
    assert 'running_lora_adapters="a"' in info[0] and 'waiting_lora_adapters=""' in info[0]
    assert 'max_lora="4"' in info[0]
    assert float(info[0].split()[-1]) == pytest.approx(time.time(), abs=60)
    assert value(metrics, "loraplex_num_requests_running") == 1
    assert value(metrics, "loraplex_kv_cache_usage_ratio") == 0.125


def test_step_and_adapter_events(metrics):
    metrics.record_step(0.02, 48)
    metrics.record_adapter_event("miss", "device")
    metrics.record_adapter_load(0.3)
    metrics.set_adapters_resident("host", 3)
    assert value(metrics, "loraplex_engine_step_batch_tokens_sum") == 48
    assert value(metrics, "loraplex_adapter_cache_events_total", event="miss", tier="device") == 1
    assert value(metrics, "loraplex_adapter_cache_events_total", event="hit", tier="host") == 0
    assert value(metrics, "loraplex_adapter_load_seconds_count") == 1
    assert value(metrics, "loraplex_adapters_resident", tier="host") == 3


def test_engine_failures_and_slot_users(metrics):
    metrics.record_step_failure()
    metrics.record_request_failures(0)
    metrics.record_request_failures(3)
    metrics.set_adapter_slot_users(2)
    assert value(metrics, "loraplex_engine_step_failures_total") == 1
    assert value(metrics, "loraplex_engine_request_failures_total") == 3
    assert value(metrics, "loraplex_adapter_slot_users") == 2


def test_merge_swaps_move_the_merged_gauge(metrics):
    assert value(metrics, "loraplex_merged_adapter", adapter="base") == 1
    metrics.record_merge("merge", 0.05, "a")
    assert value(metrics, "loraplex_merged_adapter", adapter="a") == 1
    assert value(metrics, "loraplex_merged_adapter", adapter="base") is None
    metrics.record_merge("unmerge", 0.04, "a")
    assert value(metrics, "loraplex_merged_adapter", adapter="base") == 1
    assert value(metrics, "loraplex_merged_adapter", adapter="a") is None
    assert value(metrics, "loraplex_adapter_merge_swaps_total") == 1
    assert value(metrics, "loraplex_adapter_merge_seconds_count", op="unmerge") == 1


def test_each_metrics_object_has_its_own_registry():
    first, second = Metrics(10, 1), Metrics(10, 1)
    first.record_http_error(500)
    assert value(first, "loraplex_request_errors_total", status="500") == 1
    assert value(second, "loraplex_request_errors_total", status="500") is None
