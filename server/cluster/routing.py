"""Which engine replica serves a request: one holding its adapter, while the load stays balanced.

Ray Serve's default router sends a request for a multiplexed model to the replicas that hold it as long as one of
them has room under `max_ongoing_requests`. Under a burst that keeps every request for an adapter on the replica
that loaded it first, however unevenly the adapters fell: on 2 replicas and 32 adapters one replica served 116
requests and the other 44, then sat idle while the first one finished. This router keeps the affinity only while
a holder has at most `slack` more requests than the least loaded replica; past that, the least loaded replica gets
the request and loads the adapter (a copy into a free slot). SGLang's cache-aware router and Ray Serve LLM's prefix
affinity router bound their affinity by load the same way.

A replica's load is Ray's count of its requests in flight plus the requests routed to it that Ray has not sent yet:
Ray routes a whole burst before it sends (and counts) any of it, so its count alone would see every replica idle.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict, deque

from ray.serve.request_router import (
    FIFOMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

UNSENT_TTL_S = 1.0  # a routed request Ray never sent (its caller went away) stops counting after this


class AdapterAffinityRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """The least loaded replica holding the request's adapter within `slack` of the least loaded one, else that one."""

    def initialize_state(self, slack: int) -> None:
        self.slack = slack
        self._unsent: defaultdict[ReplicaID, deque[float]] = defaultdict(deque)  # when each was routed

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is None:
            return [candidate_replicas]
        pending_request.routing_context.should_backoff = True  # every replica full: wait before asking again
        load = {r.replica_id: self._load(r.replica_id) for r in candidate_replicas}
        with_room = [r for r in candidate_replicas if load[r.replica_id] < r.max_ongoing_requests]
        if not with_room:
            return [candidate_replicas]  # Ray probes them: its counts may be out of date
        limit = min(load[r.replica_id] for r in with_room) + self.slack
        adapter = pending_request.metadata.multiplexed_model_id  # "" for the base model, which no replica holds
        holders = [r for r in with_room if adapter in r.multiplexed_model_ids and load[r.replica_id] <= limit]
        chosen = min(holders or with_room, key=lambda r: (load[r.replica_id], random.random()))  # ties: any
        self._unsent[chosen.replica_id].append(time.monotonic())
        return [[chosen]]

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)  # Ray counts it in flight from now on
        unsent = self._unsent.get(replica_id)
        if unsent:
            unsent.popleft()

    def _load(self, replica_id: ReplicaID) -> int:
        unsent = self._unsent[replica_id]
        expired = time.monotonic() - UNSENT_TTL_S
        while unsent and unsent[0] < expired:
            unsent.popleft()
        return (self.replica_queue_len_cache.get(replica_id) or 0) + len(unsent)
