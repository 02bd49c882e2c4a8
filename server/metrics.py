"""The one metrics module: every Prometheus collector of the server and the small methods that record them.

The collectors live on a `CollectorRegistry` owned by one `Metrics` object per app (and so per engine), never on
prometheus_client's global registry, so several apps can share a process. Names follow Prometheus' rules (the
`loraplex_` prefix, base units, `_total` counters); histogram buckets are vLLM's, so dashboards and SLOs carry
over. The `adapter` label takes at most `max_adapters` distinct values (see `AdapterLabels`), and callers pass
only names the server resolved (an adapter it serves, or the base model's served name), never request text. The
`tenant` label works the same way with `max_tenants`: names come from the key file, never from a request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import Metric

from server.adapter_metrics import AdapterTierMetrics

# `*_created` series would double the series count, and neither the dashboard nor the gateway reads them.
disable_created_metrics()

CacheEvent = Literal["hit", "miss", "load", "eviction"]
CacheTier = Literal["host", "device"]
MergeOp = Literal["merge", "unmerge"]

PREFIX = "loraplex_"
OTHER = "other"
CONTENT_TYPE = CONTENT_TYPE_LATEST
CACHE_EVENTS: tuple[CacheEvent, ...] = ("hit", "miss", "load", "eviction")
CACHE_TIERS: tuple[CacheTier, ...] = ("host", "device")
MERGE_OPS: tuple[MergeOp, ...] = ("merge", "unmerge")

# vLLM's buckets (vllm/v1/metrics/loggers.py), so percentiles read the same on both servers.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
TOKEN_COUNT_BUCKETS = tuple(m * 10**e for e in range(6) for m in (1, 2, 5) if m * 10**e <= 100_000)
STEP_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# Ours, not vLLM's: a step and an adapter load or merge take milliseconds to seconds.
STEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ADAPTER_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class AdapterLabels:
    """Maps adapter names to at most `limit` distinct label values; names beyond the cap share `other`.

    Reserved names (the base model) always keep their own value and do not count against the cap. Thread-safe:
    the engine thread, the adapter loader and the event loop all record.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._reserved: set[str] = set()
        self._named: set[str] = set()
        self._lock = threading.Lock()

    def reserve(self, name: str) -> None:
        with self._lock:
            self._reserved.add(name)

    def __call__(self, name: str) -> str:
        if name in self._reserved or name in self._named:
            return name
        with self._lock:
            if len(self._named) < self.limit:
                self._named.add(name)
                return name
        return OTHER


class LabelledCollector:
    """The metric families of `source` with constant `labels` added to every sample."""

    def __init__(self, source: CollectorRegistry, labels: Mapping[str, str]) -> None:
        self.source = source
        self.labels = dict(labels)

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [s._replace(labels={**s.labels, **self.labels}) for s in family.samples]
            yield labelled


@dataclass
class RequestTrace:
    """Timestamps (time.monotonic) of one request as its caller saw it: submitted, scheduled, tokens, end."""

    num_prompt_tokens: int
    submitted: float = field(default_factory=time.monotonic)
    scheduled: float | None = None  # when the engine first scheduled it
    first_token: float | None = None
    last_token: float | None = None
    ended: float | None = None  # None until the engine finishes it: a request left early is "cancelled"
    inter_token_latencies: list[float] = field(default_factory=list)
    num_generation_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens the prefix cache held when the engine admitted it
    finish_reason: str = "cancelled"

    def on_output(self, num_new_tokens: int, scheduled: float | None, finish_reason: str | None) -> None:
        """Note an output that arrived now with `num_new_tokens` tokens; `finish_reason` set on the last one."""
        now = time.monotonic()
        if self.scheduled is None:
            self.scheduled = scheduled
        if num_new_tokens:
            if self.last_token is not None:
                self.inter_token_latencies.append((now - self.last_token) / num_new_tokens)
            if self.first_token is None:
                self.first_token = now
            self.last_token = now
            self.num_generation_tokens += num_new_tokens
        if finish_reason is not None:
            self.ended = now
            self.finish_reason = finish_reason


def _histogram(name: str, doc: str, registry: CollectorRegistry, buckets: Iterable[float], *labels: str) -> Histogram:
    return Histogram(name, doc, labels, registry=registry, buckets=tuple(buckets))


class Metrics:
    """All collectors of one server, on its own registry, and the methods that record them."""

    def __init__(self, max_adapters: int, max_loras: int, max_tenants: int = 100) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.adapter_labels = AdapterLabels(max_adapters)
        self.tenant_labels = AdapterLabels(max_tenants)
        self.max_loras = max_loras
        self._base_model: str | None = None
        self._lora_info: tuple[str, str, str] | None = None
        self._merged: str | None = None
        self._define_request_collectors(PREFIX)
        self._define_engine_collectors(PREFIX)
        self._define_adapter_collectors(PREFIX)
        self.adapter_tiers = AdapterTierMetrics(self.registry, PREFIX)  # loads between tiers, bytes per tier
        self._define_tenant_collectors(PREFIX)
        self._define_speculation_collectors(PREFIX)

    def _define_request_collectors(self, p: str) -> None:
        r = self.registry
        self.ttft = _histogram(f"{p}time_to_first_token_seconds", "Time to first token.", r, TTFT_BUCKETS, "adapter")
        self.itl = _histogram(f"{p}inter_token_latency_seconds", "Time between tokens.", r, ITL_BUCKETS, "adapter")
        self.e2e = _histogram(
            f"{p}e2e_request_latency_seconds", "Submission to last output.", r, REQUEST_LATENCY_BUCKETS, "adapter"
        )
        self.queue_time = _histogram(
            f"{p}request_queue_time_seconds", "Submission to first scheduling.", r, REQUEST_LATENCY_BUCKETS, "adapter"
        )
        self.prompt_hist = _histogram(
            f"{p}request_prompt_tokens", "Prompt tokens per request.", r, TOKEN_COUNT_BUCKETS, "adapter"
        )
        self.generation_hist = _histogram(
            f"{p}request_generation_tokens", "Generated tokens per request.", r, TOKEN_COUNT_BUCKETS, "adapter"
        )
        self.prompt_tokens = Counter(f"{p}prompt_tokens", "Prompt tokens processed.", ["adapter"], registry=r)
        self.generation_tokens = Counter(f"{p}generation_tokens", "Tokens generated.", ["adapter"], registry=r)
        self.requests = Counter(
            f"{p}requests", "Requests ended, by finish reason.", ["adapter", "finish_reason"], registry=r
        )
        self.errors = Counter(f"{p}request_errors", "HTTP error responses, by status.", ["status"], registry=r)
        # vLLM's names; both count tokens, so hits / queries is the share of prompt tokens not recomputed.
        self.prefix_queries = Counter(
            f"{p}prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", ["adapter"], registry=r
        )
        self.prefix_hits = Counter(
            f"{p}prefix_cache_hits", "Prompt tokens found in the prefix cache.", ["adapter"], registry=r
        )

    def _define_engine_collectors(self, p: str) -> None:
        r = self.registry
        self.running = Gauge(f"{p}num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge(f"{p}num_requests_waiting", "Requests waiting to be scheduled.", registry=r)
        self.kv_usage = Gauge(f"{p}kv_cache_usage_ratio", "Share of KV-cache blocks in use, 0 to 1.", registry=r)
        self.step_seconds = _histogram(f"{p}engine_step_seconds", "Duration of engine step.", r, STEP_SECONDS_BUCKETS)
        self.step_tokens = _histogram(
            f"{p}engine_step_batch_tokens", "Tokens (prefill + decode) computed in one step.", r, STEP_TOKEN_BUCKETS
        )
        self.step_failures = Counter(f"{p}engine_step_failures", "Engine steps that failed as a whole.", registry=r)
        self.request_failures = Counter(
            f"{p}engine_request_failures", "Requests that failed inside the engine, each alone.", registry=r
        )
        self.slot_users = Gauge(
            f"{p}adapter_slot_users", "Running sequences holding an adapter device slot.", registry=r
        )
        # vLLM's gauge, read by the Kubernetes Gateway API Inference Extension to route by resident adapters.
        self.lora_info = Gauge(
            f"{p}lora_requests_info",
            "Adapters of running and waiting requests; the value is the unix time of the update.",
            ["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
            registry=r,
        )
        self.record_scheduler_state(0, 0, 0.0, (), ())

    def _define_adapter_collectors(self, p: str) -> None:
        r = self.registry
        self.cache_events = Counter(
            f"{p}adapter_cache_events", "Adapter cache hits, misses, loads, evictions.", ["event", "tier"], registry=r
        )
        self.resident = Gauge(f"{p}adapters_resident", "Adapters resident in each tier.", ["tier"], registry=r)
        self.host_bytes = Gauge(
            f"{p}adapter_host_bytes", "Bytes of adapter weights in host memory (see --max-cpu-lora-bytes).", registry=r
        )
        self.merged = Gauge(
            f"{p}merged_adapter", "1 for the adapter merged into the base weights (the base model if none).",
            ["adapter"], registry=r,
        )  # fmt: skip
        self.merge_swaps = Counter(f"{p}adapter_merge_swaps", "Adapters merged into the base weights.", registry=r)
        self.load_seconds = _histogram(
            f"{p}adapter_load_seconds", "Loading an adapter from disk to host memory.", r, ADAPTER_SECONDS_BUCKETS
        )
        self.merge_seconds = _histogram(
            f"{p}adapter_merge_seconds", "Merging or unmerging an adapter.", r, ADAPTER_SECONDS_BUCKETS, "op"
        )
        for tier in CACHE_TIERS:  # known label values exist from the start, so rates read 0 rather than nothing
            self.resident.labels(tier).set(0)
            for event in CACHE_EVENTS:
                self.cache_events.labels(event, tier)
        for op in MERGE_OPS:
            self.merge_seconds.labels(op)

    def _define_tenant_collectors(self, p: str) -> None:
        r = self.registry
        self.tenant_requests = Counter(
            f"{p}tenant_requests", "Generation requests admitted, by tenant.", ["tenant"], registry=r
        )
        self.tenant_generation_tokens = Counter(
            f"{p}tenant_generation_tokens", "Tokens generated, by tenant.", ["tenant"], registry=r
        )
        self.tenant_refusals = Counter(
            f"{p}tenant_refusals", "Requests refused with 401, 404 or 429, by tenant ('' for 401).",
            ["tenant", "status"], registry=r,
        )  # fmt: skip

    def _define_speculation_collectors(self, p: str) -> None:
        """vLLM's names; the acceptance rate is accepted over proposed (the dashboard divides their rates)."""
        r = self.registry
        self.spec_proposed = Counter(
            f"{p}spec_decode_num_draft_tokens", "Proposed tokens verified (speculation).", ["adapter"], registry=r
        )
        self.spec_accepted = Counter(
            f"{p}spec_decode_num_accepted_tokens", "Proposed tokens accepted by verification.", ["adapter"], registry=r
        )

    def set_base_model(self, name: str) -> None:
        """Name the base model: its own `adapter` label value, and the merged one until an adapter is merged."""
        self._base_model = name
        self.adapter_labels.reserve(name)
        self._set_merged(name)
        self.record_speculation([(None, 0, 0)])  # the base model's series exist (at 0) whether or not it speculates

    def render(self, labels: Mapping[str, str] | None = None) -> bytes:
        """The exposition text of every collector (serve with CONTENT_TYPE), each sample with `labels` added.

        A replica of a Ray Serve deployment passes `{"replica": its id}`, so the series of all replicas merge.
        """
        return generate_latest(LabelledCollector(self.registry, labels) if labels else self.registry)

    def record_request(self, adapter: str, trace: RequestTrace) -> None:
        """Record a request that ended; `adapter` is the resolved adapter name or the base model's served name."""
        label = self.adapter_labels(adapter)
        self.requests.labels(label, trace.finish_reason).inc()
        self.prompt_tokens.labels(label).inc(trace.num_prompt_tokens)
        self.generation_tokens.labels(label).inc(trace.num_generation_tokens)
        if trace.scheduled is not None:  # admitted, so its prompt was looked up in the prefix cache
            self.queue_time.labels(label).observe(max(0.0, trace.scheduled - trace.submitted))
            self.prefix_queries.labels(label).inc(trace.num_prompt_tokens)
            self.prefix_hits.labels(label).inc(trace.num_cached_tokens)
        if trace.first_token is not None:
            self.ttft.labels(label).observe(trace.first_token - trace.submitted)
        itl = self.itl.labels(label)
        for seconds in trace.inter_token_latencies:
            itl.observe(seconds)
        if trace.ended is not None:
            self.e2e.labels(label).observe(trace.ended - trace.submitted)
            self.prompt_hist.labels(label).observe(trace.num_prompt_tokens)
            self.generation_hist.labels(label).observe(trace.num_generation_tokens)

    def record_step(self, seconds: float, batch_tokens: int) -> None:
        """Record one engine step that computed `batch_tokens` tokens."""
        self.step_seconds.observe(seconds)
        self.step_tokens.observe(batch_tokens)

    def record_speculation(self, counts: Iterable[tuple[str | None, int, int]]) -> None:
        """Count proposed and accepted tokens per adapter name (None: the base model) since the last call."""
        for adapter, proposed, accepted in counts:
            label = self.adapter_labels(adapter or self._base_model or "base")
            self.spec_proposed.labels(label).inc(proposed)
            self.spec_accepted.labels(label).inc(accepted)

    def record_step_failure(self) -> None:
        self.step_failures.inc()

    def record_request_failures(self, count: int) -> None:
        """Count `count` requests that ended with an error inside the engine (0 is allowed and records nothing)."""
        if count:
            self.request_failures.inc(count)

    def set_adapter_slot_users(self, count: int) -> None:
        self.slot_users.set(count)

    def record_scheduler_state(
        self,
        running: int,
        waiting: int,
        kv_usage: float,
        running_adapters: Iterable[str],
        waiting_adapters: Iterable[str],
    ) -> None:
        """Set the queue and cache gauges; the adapter lists are the distinct adapters of running/waiting requests."""
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)
        info = (",".join(sorted(running_adapters)), ",".join(sorted(waiting_adapters)), str(self.max_loras))
        self.lora_info.labels(*info).set(time.time())
        if self._lora_info is not None and self._lora_info != info:
            self.lora_info.remove(*self._lora_info)  # one series at a time: the label sets are unbounded
        self._lora_info = info

    def record_tenant_request(self, tenant: str) -> None:
        self.tenant_requests.labels(self.tenant_labels(tenant)).inc()

    def record_tenant_tokens(self, tenant: str, count: int) -> None:
        self.tenant_generation_tokens.labels(self.tenant_labels(tenant)).inc(count)

    def record_tenant_refusal(self, tenant: str | None, status: str) -> None:
        """Count a refusal (`status` "401", "404" or "429") of `tenant`'s request; None when no key was valid."""
        label = "" if tenant is None else self.tenant_labels(tenant)
        self.tenant_refusals.labels(label, status).inc()

    def record_http_error(self, status: int) -> None:
        self.errors.labels(str(status)).inc()

    def record_adapter_event(self, event: CacheEvent, tier: CacheTier) -> None:
        """Count a cache hit, miss, load or eviction of an adapter in the host or device tier."""
        self.cache_events.labels(event, tier).inc()

    def set_adapters_resident(self, tier: CacheTier, count: int) -> None:
        self.resident.labels(tier).set(count)

    def set_adapter_host_bytes(self, num_bytes: int) -> None:
        self.host_bytes.set(num_bytes)

    def record_adapter_load(self, seconds: float) -> None:
        """Record the time to read, validate and prepare one adapter in host memory."""
        self.load_seconds.observe(seconds)

    def record_merge(self, op: MergeOp, seconds: float, adapter: str) -> None:
        """Record merging `adapter` into the base weights, or unmerging it (which leaves the base model merged)."""
        self.merge_seconds.labels(op).observe(seconds)
        if op == "merge":
            self.merge_swaps.inc()
            self._set_merged(adapter)
        elif self._base_model is not None:
            self._set_merged(self._base_model)

    def _set_merged(self, adapter: str) -> None:
        label = self.adapter_labels(adapter)
        self.merged.labels(label).set(1)
        if self._merged is not None and self._merged != label:
            self.merged.remove(self._merged)
        self._merged = label
