"""Per-tenant limits: requests and generated tokens per sliding minute, and requests in flight.

A request is admitted only if every limit allows it, and then counts against all of them at once, under one lock,
so N concurrent requests against a limit of L per minute admit exactly L. Requests per minute are exact (one entry
per admission); generated tokens are summed per second of the clock (so the window is exact to the second) and
counted as they are generated: a request is admitted while the tenant's tokens of the last minute are under its
limit, so the one that crosses it finishes. `Retry-After` is when the window next admits a request: when the oldest
admission leaves it, or when enough old tokens leave it. The clock is injectable, so tests are deterministic.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from server.errors import QuotaExceededError

Clock = Callable[[], float]  # seconds, monotonic
WINDOW_S = 60.0
TOKEN_BUCKET_S = 1.0  # tokens generated within one second of each other share one window entry
CONCURRENCY_RETRY_S = 1  # a slot frees when some running request ends; nothing predicts when


@dataclass(frozen=True)
class Limits:
    """A tenant's limits; None is unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None


class SlidingWindow:
    """Amounts added over the last `span_s` seconds, as (time, amount) entries oldest first."""

    def __init__(self, span_s: float = WINDOW_S, bucket_s: float = 0.0) -> None:
        self.span_s = span_s
        self.bucket_s = bucket_s
        self._entries: deque[list[float]] = deque()  # [time, amount]
        self._total = 0.0

    def total(self, now: float) -> float:
        self._expire(now)
        return self._total

    def add(self, now: float, amount: float) -> None:
        self._expire(now)
        if self._entries and now - self._entries[-1][0] < self.bucket_s:
            self._entries[-1][1] += amount
        else:
            self._entries.append([now, amount])
        self._total += amount

    def wait_s(self, now: float, limit: float) -> float:
        """Seconds until the total is under `limit` (> 0) again: when enough of the oldest entries have left."""
        remaining, wait = self.total(now), 0.0
        for start, amount in self._entries:
            if remaining < limit:
                break
            remaining, wait = remaining - amount, start + self.span_s - now
        return wait

    def _expire(self, now: float) -> None:
        while self._entries and self._entries[0][0] <= now - self.span_s:
            self._total -= self._entries.popleft()[1]
        if not self._entries:
            self._total = 0.0  # no float drift survives an empty window


class Quota:
    """The usage of one tenant: its requests in flight, requests and tokens of the last minute. It survives reloads
    of the key file, which may change the limits it is checked against."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.running = 0
        self._requests = SlidingWindow()
        self._tokens = SlidingWindow(bucket_s=TOKEN_BUCKET_S)
        self._lock = threading.Lock()

    def admit(self, limits: Limits) -> Lease:
        """Count a new request against every limit, or raise QuotaExceededError naming the limit and when to retry."""
        with self._lock:
            now = self.clock()
            self._check(limits, now)
            self._requests.add(now, 1)
            self.running += 1
        return Lease(self)

    def record_tokens(self, count: int) -> None:
        if count:
            with self._lock:
                self._tokens.add(self.clock(), count)

    def release(self) -> None:
        with self._lock:
            self.running -= 1

    def _check(self, limits: Limits, now: float) -> None:
        if limits.concurrent_requests is not None and self.running >= limits.concurrent_requests:
            raise _exceeded(f"{limits.concurrent_requests} concurrent requests", CONCURRENCY_RETRY_S)
        rpm = limits.requests_per_minute
        if rpm is not None and self._requests.total(now) >= rpm:
            raise _exceeded(f"{rpm} requests per minute", self._requests.wait_s(now, rpm))
        tpm = limits.tokens_per_minute
        if tpm is not None and self._tokens.total(now) >= tpm:
            raise _exceeded(f"{tpm} generated tokens per minute", self._tokens.wait_s(now, tpm))


class Lease:
    """One admitted request's place in its tenant's concurrency limit; release it once, when the request ends."""

    def __init__(self, quota: Quota) -> None:
        self.quota = quota
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.quota.release()


def _exceeded(limit: str, wait_s: float) -> QuotaExceededError:
    retry_after_s = max(1, math.ceil(wait_s))
    return QuotaExceededError(
        f"rate limit reached: this API key's tenant may make {limit}; retry after {retry_after_s} s",
        retry_after_s=retry_after_s,
        code="rate_limit_exceeded",
    )
