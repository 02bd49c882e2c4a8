"""What a caller asks the engine to generate, and the generation policy that turns it into engine work.

Whoever the caller (the chat, completions and responses routes, a Ray replica, a test), the same rules hold:

- a sampling field the request leaves out (None) takes the model's default (`GenerationDefaults`), else the engine's;
- a temperature below GREEDY_BELOW is greedy (0), whoever set it;
- max_tokens left out is what the context has left after the prompt (capped by `default_max_tokens`);
- each prompt gets `best_of` samples (n when best_of is not given), sample i seeded with `seed + i`; job `p * s + i`
  is sample i of prompt p (s: samples per prompt), and `most_likely` keeps each prompt's n most likely samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from server.engine.generation_defaults import GenerationDefaults
from server.engine.sequence import INT64_MAX, SamplingParams
from server.errors import InvalidRequestError

if TYPE_CHECKING:
    from server.engine.structured import GrammarSpec

T = TypeVar("T")
_ENGINE_DEFAULTS = SamplingParams()
GREEDY_BELOW = 1e-5  # temperatures below this are greedy, as in vLLM: dividing logits by them would overflow


@dataclass(frozen=True)
class Job:
    """One sample to generate: its index among the response's choices, its prompt and its sampling parameters."""

    index: int
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class SamplingRequest:
    """A request's sampling and stopping fields as the client gave them; None: left out, for the engine to fill in.

    Checked when built (InvalidRequestError naming the field); each sample's SamplingParams checks the rest.
    """

    n: int = 1  # samples returned per prompt
    best_of: int | None = None  # samples generated per prompt, the n most likely returned; None: n
    max_tokens: int | None = None  # None: the rest of the context, at most default_max_tokens
    default_max_tokens: int | None = None  # None: no cap on the rest of the context
    returns_prompt: bool = False  # the caller answers with the prompt itself (completions' echo): max_tokens may be 0
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # 0 or -1 disables top-k
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None  # sample i uses seed + i
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    speculative: bool = True  # False: this request opts out of speculative decoding
    logprobs: int | None = None  # alternatives reported per generated token; None: no log-probabilities
    prompt_logprobs: int | None = None  # the same for prompt tokens; None: the prompt is not scored
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    structured: GrammarSpec | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise InvalidRequestError(f"n must be at least 1, got {self.n!r}", param="n")
        if self.best_of is not None and (not isinstance(self.best_of, int) or self.best_of < self.n):
            raise InvalidRequestError(f"best_of must be at least n ({self.n}), got {self.best_of!r}", param="best_of")
        if self.seed is not None and self.seed + self.samples_per_prompt - 1 > INT64_MAX:
            raise InvalidRequestError(
                f"seed {self.seed} + {self.samples_per_prompt - 1} is over {INT64_MAX}: sample i of a prompt uses "
                "seed + i; lower the seed",
                param="seed",
            )

    @property
    def samples_per_prompt(self) -> int:
        """Sequences generated per prompt: best_of may ask for more than the n returned."""
        return self.best_of or self.n

    @property
    def ranks(self) -> bool:
        """Whether the samples are ranked (best_of over n), which needs their tokens' log-probabilities."""
        return self.samples_per_prompt > self.n

    def jobs(self, prompts: list[list[int]], max_model_len: int, defaults: GenerationDefaults) -> list[Job]:
        """One job per (prompt, sample): job `p * s + i` is sample i of prompt p, s samples per prompt."""
        samples = self.samples_per_prompt
        return [
            Job(p * samples + i, prompt, self.params(i, len(prompt), max_model_len, defaults))
            for p, prompt in enumerate(prompts)
            for i in range(samples)
        ]

    def params(self, sample: int, prompt_len: int, max_model_len: int, defaults: GenerationDefaults) -> SamplingParams:
        """The engine's parameters for sample `sample` of a prompt of `prompt_len` tokens."""
        max_tokens = self._max_tokens(prompt_len, max_model_len)
        if self.min_tokens > max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({max_tokens})", param="min_tokens"
            )
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=_greedy_if_tiny(_pick(self.temperature, defaults.temperature, _ENGINE_DEFAULTS.temperature)),
            top_p=_pick(self.top_p, defaults.top_p, _ENGINE_DEFAULTS.top_p),
            top_k=max(_pick(self.top_k, defaults.top_k, _ENGINE_DEFAULTS.top_k), 0),
            min_p=_pick(self.min_p, defaults.min_p, _ENGINE_DEFAULTS.min_p),
            repetition_penalty=_pick(
                self.repetition_penalty, defaults.repetition_penalty, _ENGINE_DEFAULTS.repetition_penalty
            ),
            seed=None if self.seed is None else self.seed + sample,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            speculative=self.speculative,
            logprobs=0 if self.logprobs is None and self.ranks else self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=self.logit_bias,
            structured=self.structured,
        )
        if self.ranks and params.greedy:
            raise InvalidRequestError(
                f"best_of ({self.best_of}) must equal n ({self.n}) with greedy sampling (temperature 0), whose "
                "samples are all the same",
                param="best_of",
            )
        return params

    def most_likely(self, results: dict[int, T], logprob: Callable[[T], float]) -> dict[int, T]:
        """Each prompt's n samples with the highest total log-probability (`logprob`), most likely first, re-indexed
        `p * n + j`; `results` maps job index to a finished sample."""
        if not self.ranks:
            return results
        samples, best = self.samples_per_prompt, {}
        for prompt in range(len(results) // samples):
            group = sorted((results[prompt * samples + i] for i in range(samples)), key=logprob, reverse=True)
            best.update({prompt * self.n + j: result for j, result in enumerate(group[: self.n])})
        return best

    def _max_tokens(self, prompt_len: int, max_model_len: int) -> int:
        if self.max_tokens is None:
            # At least 1, so that a prompt that fills the context is refused by the engine with both numbers named.
            left = max(max_model_len - prompt_len, 1)
            return left if self.default_max_tokens is None else min(self.default_max_tokens, left)
        if self.max_tokens == 0 and not self.returns_prompt:
            raise InvalidRequestError(
                "max_tokens 0 generates nothing; set echo to score the prompt", param="max_tokens"
            )
        return self.max_tokens


def _greedy_if_tiny(temperature: float) -> float:
    return 0.0 if temperature < GREEDY_BELOW else temperature


def _pick(requested: T | None, model_default: T | None, engine_default: T) -> T:
    if requested is not None:
        return requested
    return engine_default if model_default is None else model_default
