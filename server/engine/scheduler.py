"""Iteration-level batching: every step, which sequences compute how many of their tokens."""

from __future__ import annotations

import bisect
from collections import Counter, deque
from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass, field

from server.engine.block_manager import BlockHash, BlockManager
from server.engine.overtaking import OvertakeGuard, insert_by_arrival
from server.engine.sequence import FinishReason, Sequence, SequenceStatus
from server.errors import InvalidRequestError
from server.settings import Settings


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits on one engine step and on the set of running sequences."""

    max_num_seqs: int  # most sequences running at once
    max_num_batched_tokens: int  # most tokens (prefill chunks + decodes) computed in one step
    max_model_len: int  # longest sequence (prompt + output) the engine lets run
    max_loras: int  # most distinct adapters among running sequences, hence in any step
    watermark: float = 0.01  # share of KV blocks admissions leave free, so they don't force preemption next step
    cached_first: bool = False  # admit mostly-cached prompts ahead of the queue (see `Scheduler._schedule_cached`)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "max_loras"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")

    @classmethod
    def from_settings(cls, settings: Settings, max_model_len: int) -> SchedulerConfig:
        """The config for `settings`, with `max_model_len` resolved against the model's context length."""
        return cls(
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            max_model_len=max_model_len,
            max_loras=settings.max_loras,
            cached_first=settings.schedule_policy == "cached-first",
        )


@dataclass(frozen=True)
class ScheduledSequence:
    """One sequence's share of a step: tokens `[start, start + num_new_tokens)` of its `token_ids`."""

    seq: Sequence
    num_new_tokens: int
    start: int  # the sequence's num_computed_tokens when scheduled
    samples: bool  # the chunk ends at the sequence's last token, so the step samples its next token
    num_draft: int = 0  # trailing tokens of the chunk that are proposals (`seq.draft_token_ids`), not yet its own

    @classmethod
    def chunk(cls, seq: Sequence, num_new_tokens: int) -> ScheduledSequence:
        start = seq.num_computed_tokens
        num_draft = max(0, start + num_new_tokens - len(seq))
        return cls(seq, num_new_tokens, start, start + num_new_tokens >= len(seq), num_draft)

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_slice(self.start, self.end)


@dataclass
class SchedulerOutput:
    """What one step computes, and which sequences lost their KV cache to make room for it."""

    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def _always_ready(adapter: str) -> bool:
    return True


def _always_fits(adapter: str, in_use: Set[str]) -> bool:
    return True


def _adapter_counts(seqs: Iterable[Sequence]) -> Counter[str]:
    return Counter(seq.adapter for seq in seqs if seq.adapter is not None)


CACHED_FIRST_SHARE = 0.75  # a prompt at least this much in the prefix cache may be admitted ahead of the queue


class Scheduler:
    """FCFS continuous batching with chunked prefill, recompute preemption and a cap on distinct adapters.

    Each step first continues the running sequences in arrival order, preempting the latest arrivals when
    KV blocks run out, then admits waiting ones: with `cached_first`, prompts mostly in the prefix cache first (a
    few tokens each gives them their first token in this step), then everyone else in arrival order. The engine
    drives it: `schedule()`, run the model, `advance(output)`, append each sampled token, `finish()` the sequences
    that stop.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        adapter_ready: Callable[[str], bool] = _always_ready,
        adapter_fits: Callable[[str, Set[str]], bool] = _always_fits,
    ) -> None:
        if block_manager.capacity < config.max_model_len:
            raise ValueError(
                f"the KV cache holds {block_manager.capacity} tokens, fewer than max_model_len "
                f"{config.max_model_len}: give it more memory or lower max_model_len"
            )
        self.config = config
        self.block_manager = block_manager
        self.adapter_ready = adapter_ready  # False while an adapter is still loading: its requests wait
        self.adapter_fits = adapter_fits  # False while no device slot can take it next to those in use (pinned ones)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # ordered by arrival_time
        self._overtakes = OvertakeGuard()  # bounds how often ready requests without a free adapter slot are passed
        self._watermark_blocks = int(config.watermark * block_manager.num_blocks)
        self.num_preemptions = 0  # since start, for metrics

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def running_adapters(self) -> Counter[str]:
        """Running sequences per adapter name (base-model sequences are not counted)."""
        return _adapter_counts(self.running)

    @property
    def waiting_adapters(self) -> Counter[str]:
        """Waiting sequences per adapter name (base-model sequences are not counted)."""
        return _adapter_counts(self.waiting)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence behind the ones already waiting."""
        if len(seq) > self.config.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(seq)} tokens, more than the model's maximum {self.config.max_model_len}",
                param="prompt",
            )
        if seq.status is not SequenceStatus.WAITING or seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"{seq.request_id} is not a fresh sequence")
        insert_by_arrival(self.waiting, seq)  # one whose adapter loaded since it arrived takes back its place

    def abort(self, request_id: str) -> Sequence | None:
        """Cancel a waiting or running sequence; None when no unfinished sequence has this id."""
        seq = next((s for s in (*self.running, *self.waiting) if s.request_id == request_id), None)
        if seq is not None:
            self.finish(seq, FinishReason.CANCELLED)
        return seq

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Mark `seq` finished, drop it from the queues and free its KV blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's sequences and chunk sizes, allocating their KV blocks."""
        output = SchedulerOutput()
        budget = self._schedule_running(output)
        if not output.preempted:  # memory is short: re-admitting now would only thrash
            if self.config.cached_first:
                budget -= self._schedule_cached(output, budget // 2)
            self._schedule_waiting(output, budget, self._blocks_in_flight(output))
        return output

    def _blocks_in_flight(self, output: SchedulerOutput) -> set[BlockHash]:
        """Hashes of the full blocks this step's chunks so far complete (cached after the step)."""
        blocks = (self.block_manager.completed_blocks(item.seq, item.start, item.end) for item in output.scheduled)
        return {digest for chunk in blocks for digest in chunk}

    def advance(self, output: SchedulerOutput) -> None:
        """Count the tokens the step computed; sequences finished since `schedule()` are skipped."""
        for item in output.scheduled:
            if item.seq.status is SequenceStatus.RUNNING:
                item.seq.num_computed_tokens = item.end - item.num_draft  # the engine adds the accepted proposals
                self.block_manager.cache_computed(item.seq)

    def _schedule_running(self, output: SchedulerOutput) -> int:
        """Schedule running sequences in arrival order; returns the token budget left."""
        budget = self.config.max_num_batched_tokens
        pending = deque(self.running)
        while pending and budget > 0:
            seq = pending.popleft()
            self._check_runnable(seq)
            num_new = self._num_new_tokens(seq, budget)
            if self._reserve_blocks(seq, seq.num_computed_tokens + num_new, pending, output):
                output.scheduled.append(ScheduledSequence.chunk(seq, num_new))
                budget -= num_new
        return budget

    def _num_new_tokens(self, seq: Sequence, budget: int) -> int:
        """Tokens a running `seq` computes this step within `budget`: what it has left, plus the proposals verified
        with a decoding sequence's next token (speculative decoding) that fit; those that don't are dropped."""
        num_new = min(seq.num_uncomputed_tokens, budget)
        extra = min(len(seq.draft_token_ids), budget - num_new) if seq.num_uncomputed_tokens == 1 else 0
        if extra and not self.block_manager.can_allocate(seq, len(seq) + extra):
            extra = 0  # proposals never cost another sequence its KV cache
        del seq.draft_token_ids[extra:]
        return num_new + extra

    def _reserve_blocks(
        self, seq: Sequence, num_tokens: int, pending: deque[Sequence], output: SchedulerOutput
    ) -> bool:
        """Allocate blocks for `seq`, preempting the latest pending arrivals (at worst `seq` itself) to make room."""
        while not self.block_manager.can_allocate(seq, num_tokens):
            victim = pending.pop() if pending else seq
            self._preempt(victim, output)
            if victim is seq:
                return False
        self.block_manager.allocate(seq, num_tokens)
        return True

    def _preempt(self, seq: Sequence, output: SchedulerOutput) -> None:
        """Drop `seq`'s KV cache and put it first in line; it is recomputed from its tokens when readmitted."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        output.preempted.append(seq)

    def _schedule_cached(self, output: SchedulerOutput, budget: int) -> int:
        """Admit waiting sequences whose prompt is mostly cached, in arrival order, within `budget` tokens (half the
        step's); returns the tokens used.

        Requests that share a task prefix get their first token as soon as the prefix is cached instead of behind
        every uncached prompt that arrived before them (SGLang's longest-prefix-first, bounded): what they still need
        is a quarter of their prompt at most, and the other half of the budget keeps the queue's head moving.
        """
        used = 0
        adapters = set(self.running_adapters)
        for seq in self.waiting:
            if used >= budget or len(self.running) >= self.config.max_num_seqs:
                break
            prefix = self._reusable_prefix(seq) if self._adapter_allows(seq, adapters) else []
            cached = len(prefix) * self.block_manager.block_size
            if not prefix or cached < CACHED_FIRST_SHARE * len(seq) or len(seq) - cached > budget - used:
                continue
            self._check_runnable(seq)
            used += self._start(seq, self._admit(seq, budget - used), adapters, output)
        if used:
            self.waiting = deque(seq for seq in self.waiting if seq.status is SequenceStatus.WAITING)
        return used

    def _start(self, seq: Sequence, num_new: int | None, adapters: set[str], output: SchedulerOutput) -> int:
        """Move an admitted `seq` (its first chunk `num_new` tokens; None: not admitted) to running."""
        if num_new is None:
            return 0
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.arrival_time)
        if seq.adapter is not None:
            adapters.add(seq.adapter)
        output.scheduled.append(ScheduledSequence.chunk(seq, num_new))
        return num_new

    def _schedule_waiting(self, output: SchedulerOutput, budget: int, in_flight: set[BlockHash]) -> None:
        """Admit waiting sequences in order; ones whose adapter can't run yet are skipped, not blocking others.

        So is one whose next uncached block another chunk of this step computes (`in_flight`, grown as sequences
        are admitted): a burst sharing a new prefix computes it once, and the rest find it cached next step.
        """
        adapters = set(self.running_adapters)
        manager = self.block_manager
        guard = self._overtakes
        guard.start()
        for seq in self.waiting:
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if not guard.allows(seq):
                continue
            if not self._adapter_allows(seq, adapters):
                if seq.adapter is not None and self.adapter_ready(seq.adapter):
                    guard.skip(seq)
                continue
            self._check_runnable(seq)
            prefix = self._reusable_prefix(seq)
            if manager.first_missing_block(seq, len(prefix)) in in_flight:
                continue
            num_new = self._admit(seq, budget, prefix)
            if num_new is None:
                break  # FCFS: later, smaller requests must not starve this one
            budget -= self._start(seq, num_new, adapters, output)
            guard.admitted()
            in_flight.update(manager.completed_blocks(seq, seq.num_computed_tokens, seq.num_computed_tokens + num_new))
        self.waiting = deque(seq for seq in self.waiting if seq.status is SequenceStatus.WAITING)
        guard.finish(self.waiting)

    def _admit(self, seq: Sequence, budget: int, prefix: list[int] | None = None) -> int | None:
        """Give `seq` its cached prefix (`_reusable_prefix`, unless given) and blocks for its next chunk; the
        chunk's size, None if it does not fit.

        Only the tokens past the cached prefix count against the budget and need new blocks.
        """
        prefix = self._reusable_prefix(seq) if prefix is None else prefix
        num_cached = len(prefix) * self.block_manager.block_size
        num_new = min(len(seq) - num_cached, budget)
        reserve = self._watermark_blocks if self.running else 0  # a lone sequence may use the whole cache
        if not self.block_manager.can_allocate(seq, num_cached + num_new, reserve=reserve, prefix=prefix):
            return None
        self.block_manager.allocate(seq, num_cached + num_new, prefix=prefix)
        seq.num_computed_tokens = num_cached
        if seq.num_cached_tokens is None:  # a preempted sequence finding its own blocks again is no prompt hit
            seq.num_cached_tokens = min(num_cached, seq.num_prompt_tokens)
        return num_new

    def _reusable_prefix(self, seq: Sequence) -> list[int]:
        """`seq`'s cached leading blocks, short of any position whose logits must still score a prompt token."""
        prefix = self.block_manager.cached_prefix(seq)
        if seq.params.prompt_logprobs is not None:  # position p scores prompt token p + 1
            prefix = prefix[: len(seq.prompt_logprobs) // self.block_manager.block_size]
        return prefix

    def _adapter_allows(self, seq: Sequence, adapters: set[str]) -> bool:
        """Whether `seq`'s adapter is loaded and fits under max_loras next to the running `adapters`."""
        if seq.adapter is None:
            return True
        fits = seq.adapter in adapters or len(adapters) < self.config.max_loras
        return fits and self.adapter_fits(seq.adapter, adapters) and self.adapter_ready(seq.adapter)

    def _check_runnable(self, seq: Sequence) -> None:
        if len(seq) > self.config.max_model_len:
            raise RuntimeError(
                f"{seq.request_id} has {len(seq)} tokens, over max_model_len {self.config.max_model_len}: "
                "the engine must finish sequences that reach it"
            )
        if seq.num_uncomputed_tokens <= 0:
            raise RuntimeError(
                f"{seq.request_id} has no token to compute: the engine must append its sampled token or finish it"
            )
