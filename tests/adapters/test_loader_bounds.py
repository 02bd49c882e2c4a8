"""The adapter loader alone: arrival order, bounded concurrency and bytes in flight, one load per key."""

from __future__ import annotations

import threading
import time
from concurrent.futures import wait

from server.adapters.loader import LOAD_WORKERS, AdapterLoader
from server.metrics import Metrics


class SlowReads:
    """A `read` that takes `seconds` and records the order and overlap of the reads."""

    def __init__(self, seconds: float = 0.02) -> None:
        self.seconds = seconds
        self.order: list[str] = []
        self.running = self.most_running = 0
        self._lock = threading.Lock()

    def __call__(self, key: str) -> object:
        with self._lock:
            self.order.append(key)
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        time.sleep(self.seconds)
        with self._lock:
            self.running -= 1
        return key


def _loader(reads: SlowReads, **kwargs) -> AdapterLoader:
    return AdapterLoader(reads, lambda key, weights: None, kwargs.pop("metrics", None), **kwargs)  # type: ignore[arg-type]


def test_many_cold_requests_for_one_adapter_load_it_once() -> None:
    reads, metrics = SlowReads(0.1), Metrics(10, 4)
    loader = _loader(reads, metrics=metrics)
    futures = [loader.load("a@1") for _ in range(50)]
    wait(futures)
    assert reads.order == ["a@1"] and {f.result() for f in futures} == {"a@1"}
    loads = metrics.adapter_tiers.loads
    assert loads.labels("host", "ok")._value.get() == 1 and loads.labels("host", "joined")._value.get() == 49
    assert not loader.loading("a@1")
    loader.shutdown()


def test_loads_run_in_the_order_they_were_asked_for() -> None:
    reads = SlowReads()
    loader = _loader(reads, workers=1)
    keys = [f"a{i}@1" for i in range(20)]
    wait([loader.load(key) for key in keys])
    assert reads.order == keys
    loader.shutdown()


def test_at_most_load_workers_loads_run_at_once() -> None:
    reads = SlowReads()
    loader = _loader(reads)
    wait([loader.load(f"a{i}@1") for i in range(12)])
    assert reads.most_running == LOAD_WORKERS > 1
    loader.shutdown()


def test_bytes_in_flight_stay_under_the_budget() -> None:
    reads = SlowReads()
    big = _loader(reads, size=lambda key: 600, max_bytes_in_flight=1000)  # two would be 1200
    wait([big.load(f"a{i}@1") for i in range(6)])
    assert reads.most_running == 1 and big.budget.in_flight == 0
    big.shutdown()
    reads = SlowReads()
    small = _loader(reads, size=lambda key: 400, max_bytes_in_flight=1000)
    wait([small.load(f"a{i}@1") for i in range(6)])
    assert reads.most_running == 2
    small.shutdown()


def test_a_load_larger_than_the_whole_budget_still_runs_alone() -> None:
    reads = SlowReads()
    loader = _loader(reads, size=lambda key: 5000, max_bytes_in_flight=1000)
    wait([loader.load(f"a{i}@1") for i in range(3)], timeout=5)
    assert len(reads.order) == 3 and reads.most_running == 1
    loader.shutdown()


def test_a_failed_load_is_counted_and_can_be_retried() -> None:
    metrics, calls = Metrics(10, 4), []

    def read(key: str) -> object:
        calls.append(key)
        if len(calls) == 1:
            raise OSError("disk hiccup")
        return key

    loader = AdapterLoader(read, lambda key, weights: None, metrics)  # type: ignore[arg-type]
    assert isinstance(loader.load("a@1").exception(timeout=5), OSError)
    assert loader.load("a@1").result(timeout=5) == "a@1"
    assert metrics.adapter_tiers.loads.labels("host", "error")._value.get() == 1
    loader.shutdown()
