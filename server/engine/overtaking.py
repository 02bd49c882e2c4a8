"""Fair admission for adapters that came in late: arrival order across cold loads, and a bound on overtaking.

A request's adapter loads before the request enters the scheduler (`AdapterCache.hold`, on arrival), so hot
requests that arrived after it go ahead meanwhile; once its adapter is in, `insert_by_arrival` gives it back its
place in the queue. A ready request can still be passed over because every device slot is taken by other adapters
(`max_loras`): `OvertakeGuard` counts how often later requests were admitted ahead of it, and once that reaches
`MAX_OVERTAKES` no later adapter request is admitted ahead of it, so running adapters drain and free a slot.
Requests on the base model need no slot and keep flowing.
"""

from __future__ import annotations

from collections import Counter, deque

from server.engine.sequence import Sequence

MAX_OVERTAKES = 32  # later requests admitted ahead of one that is ready but has no free adapter slot


def insert_by_arrival(waiting: deque[Sequence], seq: Sequence) -> None:
    """Queue `seq` behind the waiting sequences that arrived before it (usually the whole queue: at its end)."""
    index = len(waiting)
    while index > 0 and waiting[index - 1].arrival_time > seq.arrival_time:
        index -= 1
    waiting.insert(index, seq)


class OvertakeGuard:
    """Per admission pass: which waiting sequences were passed over for a slot, and whether one waited too long."""

    def __init__(self, limit: int = MAX_OVERTAKES) -> None:
        self.limit = limit
        self._passed: Counter[str] = Counter()  # request id -> later requests admitted ahead of it; waiting only
        self._skipped: list[str] = []
        self.holding = False  # a starved request is waiting for a slot: admit no later adapter request

    def start(self) -> None:
        self._skipped, self.holding = [], False

    def skip(self, seq: Sequence) -> None:
        """`seq`'s adapter is ready but no slot fits it next to the running adapters."""
        self._skipped.append(seq.request_id)
        if self._passed[seq.request_id] >= self.limit:
            self.holding = True

    def allows(self, seq: Sequence) -> bool:
        """Whether `seq` may be admitted ahead of the sequences skipped so far."""
        return seq.adapter is None or not self.holding

    def admitted(self) -> None:
        for request_id in self._skipped:
            self._passed[request_id] += 1

    def finish(self, waiting: deque[Sequence]) -> None:
        """Forget the sequences that left the queue, so the counts never outgrow it."""
        still = {seq.request_id for seq in waiting}
        for request_id in [r for r in self._passed if r not in still]:
            del self._passed[request_id]
