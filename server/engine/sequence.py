"""A request as the engine sees it: tokens, sampling parameters and progress."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.engine.logprobs import TokenLogprob
    from server.engine.structured import GrammarSpec


@dataclass(frozen=True)
class SamplingParams:
    """Validated per-request sampling and stopping parameters."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # report each sampled token's log-probability and this many alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1 = off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    min_p: float = 0.0  # 0 = off
    stop_token_ids: tuple[int, ...] = ()  # generation stops after any of these (kept out of the text, like EOS)
    structured: GrammarSpec | None = None  # what the output must match (server.engine.structured)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(eq=False)
class Sequence:
    """One generation request: prompt, generated tokens, KV blocks and how far the cache is computed.

    `num_computed_tokens` counts tokens whose K/V are in the cache; the next step computes
    tokens `[num_computed_tokens, num_computed_tokens + n)` of `token_ids`. Preemption frees the
    blocks and resets it to 0, so the sequence is recomputed from its prompt plus output so far.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # adapter key, `name@version` (server.adapters.versions); None = base model
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None  # time.monotonic() of its first step, for the queue-time metric
    adapter_slot: int | None = None  # device slot of the adapter while running; None = base model or not bound yet
    block_hashes: list[bytes] = field(default_factory=list)  # content hashes of its full blocks (block_manager)
    num_cached_blocks: int = 0  # leading blocks of block_table that the prefix cache can find
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache when first admitted
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # of prompt tokens 1.., when asked for

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """`token_ids[start:end]` without concatenating the whole prompt and output (the runner calls it every step)."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
