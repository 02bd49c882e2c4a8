"""Carry out the merge policy on the engine thread: swap between steps, and time, log and count every swap."""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from server.adapters.versions import adapter_name
from server.adapters.weights import AdapterWeights
from server.engine.merge_policy import Demand, MergePolicy
from server.engine.scheduler import Scheduler
from server.model.decoder import DecoderModel
from server.model.merge import WeightMerger

log = logging.getLogger(__name__)

SwapOp = Literal["merge", "unmerge"]
RecordSwap = Callable[[SwapOp, float, str], None]  # (op, seconds, adapter name), e.g. Metrics.record_merge


@dataclass(frozen=True)
class SwapRecord:
    """One merge or unmerge the engine carried out."""

    op: SwapOp
    adapter: str
    seconds: float
    at: float  # time.time() when it was done


class MergeController:
    """What is merged into the base weights; `update` runs the policy before each step and swaps if it says so.

    Engine thread only, like the model it changes: a swap happens between two steps, so running sequences go on
    in the next step with the same outputs, computed the other way.
    """

    def __init__(
        self,
        model: DecoderModel,
        policy: MergePolicy,
        weights_of: Callable[[str], AdapterWeights | None],
        record: RecordSwap | None = None,
        history: int = 256,
    ) -> None:
        self.weight_merger = WeightMerger(model.projections)
        self.policy = policy
        self.weights_of = weights_of  # an adapter's weights in host memory; None while it is not there
        self.record = record
        self.swaps: deque[SwapRecord] = deque(maxlen=history)  # the latest swaps, oldest first
        self.num_swaps: Counter[SwapOp] = Counter()
        self.merged: str | None = None  # the adapter merged into the base weights, if any

    @property
    def buffer_bytes(self) -> int:
        """Memory the merged weights take on top of the base weights (kept after an unmerge, for the next merge)."""
        return self.weight_merger.num_bytes

    def update(self, scheduler: Scheduler) -> None:
        """Ask the policy about the running and waiting requests; merge, unmerge or switch accordingly."""
        counts = scheduler.running_adapters + scheduler.waiting_adapters
        demand = Demand(counts, scheduler.num_running + scheduler.num_waiting)
        target = self.policy.decide(demand, self.merged, time.monotonic())
        if target != self.merged:
            self.unmerge()
            if target is not None:
                self.merge(target)
        elif self.weight_merger.needs_packing:
            self.weight_merger.pack_next()  # one layer per step: the packed GEMM returns without a long stall

    def merge(self, name: str) -> bool:
        """Merge `name` (after unmerging any other); False when its weights are not in host memory or it cannot be."""
        if name == self.merged:
            return True
        weights = self.weights_of(name)
        if weights is None:
            return False
        self.unmerge()
        start = time.perf_counter()
        try:
            self.weight_merger.merge(weights.updates)
        except ValueError as exc:
            log.warning("adapter %s cannot be merged and will be served unmerged: %s", name, exc)
            self.policy.refuse(name)
            return False
        self.merged = name
        self._done("merge", name, time.perf_counter() - start)
        return True

    def unmerge(self) -> None:
        """Restore the original base weights, if an adapter is merged."""
        name = self.merged
        if name is None:
            return
        start = time.perf_counter()
        self.weight_merger.unmerge()
        self.merged = None
        self._done("unmerge", name, time.perf_counter() - start)

    def _done(self, op: SwapOp, name: str, seconds: float) -> None:
        log.info("%s %s in %.1f ms (merge buffers: %.0f MiB)", op, name, 1e3 * seconds, self.buffer_bytes / 2**20)
        self.swaps.append(SwapRecord(op, name, seconds, time.time()))
        self.num_swaps[op] += 1
        if self.record is not None:
            self.record(op, seconds, adapter_name(name))  # metric labels carry names, not versions
