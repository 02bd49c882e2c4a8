"""A request as the engine sees it: tokens, sampling parameters and progress."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.engine.logprobs import MAX_TOP_LOGPROBS
from server.errors import InvalidRequestError

if TYPE_CHECKING:
    from server.engine.logprobs import TokenLogprob
    from server.engine.structured import GrammarSpec

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what a generator's seed takes
MIN_REPETITION_PENALTY = 0.01  # dividing a logit by less can overflow to infinity
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2], as OpenAI's
MAX_LOGIT_BIAS = 100.0  # a bias lies in [-100, 100], as OpenAI's; -100 effectively bans a token


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping parameters, checked when built: whoever builds one (the HTTP routes, a Ray
    replica, a test) gets an InvalidRequestError naming the field for a value the engine cannot honour.

    Ranges are what the engine computes; the HTTP API may be stricter (temperature at most 2, as OpenAI's). A tiny
    temperature is taken as asked (its row fails if its logits overflow): requests turn it into greedy sampling
    (`server.engine.request`).
    """

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
    speculative: bool = True  # False: never propose tokens for it, even when the server speculates

    def __post_init__(self) -> None:
        _check_sampling(self)
        _check_stopping(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


def _check_sampling(params: SamplingParams) -> None:
    _check_number("temperature", params.temperature, low=0.0)
    _check_number("top_p", params.top_p, low=0.0, high=1.0, low_open=True)
    _check_int("top_k", params.top_k, low=0)
    _check_number("min_p", params.min_p, low=0.0, high=1.0)
    _check_number("presence_penalty", params.presence_penalty, low=-MAX_PENALTY, high=MAX_PENALTY)
    _check_number("frequency_penalty", params.frequency_penalty, low=-MAX_PENALTY, high=MAX_PENALTY)
    _check_number("repetition_penalty", params.repetition_penalty, low=MIN_REPETITION_PENALTY)
    for token, bias in params.logit_bias:
        _check_int("logit_bias", token, low=0)
        _check_number("logit_bias", bias, low=-MAX_LOGIT_BIAS, high=MAX_LOGIT_BIAS)
    if params.seed is not None:
        _check_int("seed", params.seed, low=INT64_MIN, high=INT64_MAX)
    for name, wanted in (("logprobs", params.logprobs), ("prompt_logprobs", params.prompt_logprobs)):
        if wanted is not None:
            _check_int(name, wanted, low=0, high=MAX_TOP_LOGPROBS)


def _check_stopping(params: SamplingParams) -> None:
    _check_int("max_tokens", params.max_tokens, low=0)  # 0: score the prompt only
    _check_int("min_tokens", params.min_tokens, low=0)
    if any(not isinstance(stop, str) or not stop for stop in params.stop):
        raise InvalidRequestError("stop strings must be non-empty strings", param="stop")
    for token in params.stop_token_ids:
        _check_int("stop_token_ids", token, low=0)


def _check_number(name: str, value: object, *, low: float, high: float = math.inf, low_open: bool = False) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or not (low < value if low_open else low <= value) or value > high:
        bounds = f"{'(' if low_open else '['}{low}, {high}{']' if math.isfinite(high) else ')'}"
        raise InvalidRequestError(f"{name} must be a finite number in {bounds}, got {value!r}", param=name)


def _check_int(name: str, value: object, *, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidRequestError(f"{name} must be an integer {bounds}, got {value!r}", param=name)


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
    draft_token_ids: list[int] = field(default_factory=list)  # proposed next tokens the next step verifies

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
