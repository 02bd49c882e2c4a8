"""Sliding-window quotas on an injected clock: exact counts, windows that slide, Retry-After from the window."""

from __future__ import annotations

import threading

import pytest

from server.errors import QuotaExceededError
from server.tenants.quota import Limits, Quota, SlidingWindow


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def test_window_sums_the_last_span() -> None:
    window = SlidingWindow(span_s=60)
    window.add(0, 2)
    window.add(30, 3)
    assert window.total(59.9) == 5
    assert window.total(60) == 3  # the entry of t=0 leaves at exactly t=60
    assert window.total(90) == 0


def test_wait_is_until_enough_leaves() -> None:
    window = SlidingWindow(span_s=60)
    for t, amount in [(0, 4), (10, 4), (20, 4)]:
        window.add(t, amount)
    assert window.wait_s(25, limit=20) == 0  # 12 < 20 already
    assert window.wait_s(25, limit=12) == 35  # 8 < 12 once t=0 leaves at 60
    assert window.wait_s(25, limit=5) == 45  # 4 < 5 once t=10 leaves at 70
    assert window.wait_s(25, limit=1) == 55  # empty once t=20 leaves at 80


def test_buckets_merge_close_entries() -> None:
    window = SlidingWindow(span_s=60, bucket_s=1)
    window.add(0, 1)
    window.add(0.5, 1)
    window.add(1.0, 1)
    assert window.total(1) == 3
    assert window.total(60) == 1  # the first two shared the entry of t=0


def refusal(quota: Quota, limits: Limits) -> QuotaExceededError:
    with pytest.raises(QuotaExceededError) as error:
        quota.admit(limits)
    return error.value


def test_requests_per_minute_and_retry_after() -> None:
    clock, limits = Clock(), Limits(requests_per_minute=2)
    quota = Quota(clock)
    quota.admit(limits).release()
    clock.now += 15.2
    quota.admit(limits).release()
    error = refusal(quota, limits)
    assert error.retry_after_s == 45  # ceil(60 - 15.2)
    assert "2 requests per minute" in error.message and error.code == "rate_limit_exceeded"
    clock.now += 44.8
    quota.admit(limits)
    assert refusal(quota, limits).retry_after_s == 16  # the one of t=15.2 leaves at 75.2: ceil(15.2)


def test_tokens_per_minute_count_after_admission() -> None:
    clock, limits = Clock(), Limits(tokens_per_minute=10)
    quota = Quota(clock)
    quota.admit(limits)
    quota.record_tokens(9)
    quota.admit(limits)  # 9 < 10: admitted, and may take the total over
    quota.record_tokens(5)
    clock.now += 2
    assert refusal(quota, limits).retry_after_s == 58
    clock.now += 58
    quota.admit(limits)


def test_concurrent_requests_and_leases() -> None:
    limits = Limits(concurrent_requests=2)
    quota = Quota(Clock())
    first, second = quota.admit(limits), quota.admit(limits)
    assert refusal(quota, limits).retry_after_s == 1
    first.release()
    first.release()  # a second release of the same lease frees nothing more
    third = quota.admit(limits)
    assert refusal(quota, limits)
    second.release()
    third.release()
    assert quota.running == 0


def test_a_refusal_consumes_nothing() -> None:
    clock, limits = Clock(), Limits(requests_per_minute=5, concurrent_requests=1)
    quota = Quota(clock)
    lease = quota.admit(limits)
    for _ in range(10):
        refusal(quota, limits)  # refused for concurrency: the minute's count must not grow
    lease.release()
    for _ in range(4):
        quota.admit(limits).release()
    assert "5 requests per minute" in refusal(quota, limits).message


def test_exactly_the_limit_passes_across_threads() -> None:
    limits, quota = Limits(requests_per_minute=10), Quota(Clock())
    admitted: list[bool] = []
    barrier = threading.Barrier(50)

    def attempt() -> None:
        barrier.wait()
        try:
            quota.admit(limits)
        except QuotaExceededError:
            admitted.append(False)
        else:
            admitted.append(True)

    threads = [threading.Thread(target=attempt) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert admitted.count(True) == 10 and len(admitted) == 50


def test_no_limits_admit_everything() -> None:
    quota = Quota(Clock())
    for _ in range(1000):
        quota.admit(Limits())
    assert quota.running == 1000
