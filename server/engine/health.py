"""The engine's account of its own health: does its thread run, do its steps succeed, does it make progress."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from server.settings import Settings


@dataclass(frozen=True)
class HealthLimits:
    """When a running engine stops counting as healthy."""

    max_step_failures: int  # this many failed steps in a row
    stall_s: float  # this long busy without finishing a step

    @classmethod
    def from_settings(cls, settings: Settings) -> HealthLimits:
        return cls(settings.health_max_step_failures, settings.health_stall_s)


class EngineHealth:
    """Written by the engine thread, read by `/health` on the event loop.

    Plain attribute writes and reads, no lock: each reading is one consistent value, and a report a step late is
    still the truth a moment ago. Progress is a finished step, or the moment the thread last went idle or woke up:
    an engine waiting for work is not stalled, one busy for longer than `stall_s` without finishing a step is.
    """

    def __init__(self, limits: HealthLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self.consecutive_failures = 0
        self.last_progress = clock()
        self.idle = True  # blocked on its inbox with nothing to do
        self.stopped: str | None = None  # why the engine thread no longer runs

    def going_idle(self) -> None:
        self.last_progress = self._clock()
        self.idle = True

    def woke(self) -> None:
        self.last_progress = self._clock()  # before `idle` flips, so no reader sees busy with an old timestamp
        self.idle = False

    def step_done(self, failed: bool) -> None:
        self.last_progress = self._clock()
        self.consecutive_failures = self.consecutive_failures + 1 if failed else 0

    def stop(self, reason: str) -> None:
        self.stopped = reason

    def problem(self, thread_alive: bool) -> str | None:
        """Why the engine is unhealthy, or None when it is healthy."""
        if self.stopped is not None:
            return self.stopped
        if not thread_alive:
            return "the engine thread has stopped"
        if self.consecutive_failures >= self.limits.max_step_failures:
            return f"the last {self.consecutive_failures} engine steps failed; the server log has the details"
        busy_s = self._clock() - self.last_progress
        if not self.idle and busy_s > self.limits.stall_s:
            return (
                f"the engine has work but finished no step for {busy_s:.0f} s "
                f"(watchdog limit {self.limits.stall_s:g} s, --health-stall-s)"
            )
        return None
