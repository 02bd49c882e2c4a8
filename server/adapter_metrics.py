"""Collectors of the adapter tiers (disk -> host memory -> device slot): loads by tier and outcome, their latency,
the bytes each tier holds and how often a prefetch saved a request its load. Part of `server.metrics.Metrics`
(`metrics.adapter_tiers`), on its registry; every label takes a fixed set of values, never an adapter name, so
cycling through thousands of adapters adds no series.
"""

from __future__ import annotations

from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LoadTier = Literal["host", "device"]  # where a load puts the adapter: host memory (from disk) or a device slot
LoadOutcome = Literal["ok", "error", "joined"]  # joined: a caller shared a load already in flight

LOAD_TIERS: tuple[LoadTier, ...] = ("host", "device")
LOAD_OUTCOMES: tuple[LoadOutcome, ...] = ("ok", "error", "joined")
TIER_LOAD_SECONDS_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class AdapterTierMetrics:
    """Adapter loads between the tiers and what the tiers hold."""

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        p, r = prefix, registry
        self.loads = Counter(
            f"{p}adapter_loads", "Adapter loads into a tier (host: from disk; device: into a slot), by outcome.",
            ["tier", "outcome"], registry=r,
        )  # fmt: skip
        self.load_seconds = Histogram(
            f"{p}adapter_tier_load_seconds", "Loading an adapter into a tier (host: from disk; device: into a slot).",
            ["tier"], registry=r, buckets=TIER_LOAD_SECONDS_BUCKETS,
        )  # fmt: skip
        self.bytes = Gauge(f"{p}adapter_tier_bytes", "Bytes of adapter weights each tier holds.", ["tier"], registry=r)
        self.prefetch_hits = Counter(
            f"{p}adapter_prefetch_hits", "Requests that found their adapter in host memory thanks to a prefetch.",
            registry=r,
        )  # fmt: skip
        for tier in LOAD_TIERS:  # known label values exist from the start, so rates read 0 rather than nothing
            self.bytes.labels(tier).set(0)
            self.load_seconds.labels(tier)
            for outcome in LOAD_OUTCOMES:
                self.loads.labels(tier, outcome)

    def record_load(self, tier: LoadTier, outcome: LoadOutcome, seconds: float | None = None) -> None:
        self.loads.labels(tier, outcome).inc()
        if seconds is not None:
            self.load_seconds.labels(tier).observe(seconds)

    def set_bytes(self, tier: LoadTier, num_bytes: int) -> None:
        self.bytes.labels(tier).set(num_bytes)

    def record_prefetch_hit(self) -> None:
        self.prefetch_hits.inc()
