"""From a validated request to the engine's jobs: one per (prompt, sample), with its SamplingParams."""

from __future__ import annotations

from server.api.fields import INT64_MAX
from server.api.generation import Job
from server.api.schemas import GenerationRequest
from server.engine.sequence import SamplingParams
from server.engine.structured import GrammarSpec
from server.errors import InvalidRequestError
from server.settings import Settings

# Temperatures below this are greedy, as in vLLM: dividing logits by them would overflow to infinity.
GREEDY_BELOW = 1e-5


def plan_jobs(
    body: GenerationRequest, prompts: list[list[int]], max_model_len: int, structured: GrammarSpec | None = None
) -> list[Job]:
    """Job `p * n + i` is sample `i` of prompt `p` (n: samples per prompt); with a seed, sample `i` uses `seed + i`."""
    n = body.samples_per_prompt()
    if body.seed is not None and body.seed + n - 1 > INT64_MAX:
        raise InvalidRequestError(
            f"seed {body.seed} + {n - 1} is over {INT64_MAX}: sample i of a prompt uses seed + i; lower the seed",
            param="seed",
        )
    return [
        Job(p * n + i, prompt, sampling_params(body, len(prompt), max_model_len, i, structured))
        for p, prompt in enumerate(prompts)
        for i in range(n)
    ]


def sampling_params(
    body: GenerationRequest, prompt_len: int, max_model_len: int, sample: int, structured: GrammarSpec | None = None
) -> SamplingParams:
    """The engine's parameters for one sample; max_tokens defaults to what is left of the context."""
    max_tokens = body.requested_max_tokens()
    if max_tokens is None:
        max_tokens = _default_max_tokens(body, prompt_len, max_model_len)
    if max_tokens == 0 and not body.allows_zero_max_tokens():
        raise InvalidRequestError("max_tokens 0 generates nothing; set echo to score the prompt", param="max_tokens")
    if body.min_tokens > max_tokens:
        raise InvalidRequestError(
            f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens})", param="min_tokens"
        )
    defaults = SamplingParams()
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_temperature(body.temperature, defaults.temperature),
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        top_k=max(body.top_k or 0, 0),
        seed=None if body.seed is None else body.seed + sample,
        stop=tuple(body.stop or ()),
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        logprobs=_logprobs(body),
        prompt_logprobs=body.wanted_prompt_logprobs(),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        logit_bias=body.token_biases(),
        min_p=body.min_p or 0.0,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        structured=structured,
    )


def check_fits(num_prompts: int, n: int, settings: Settings) -> None:
    """400 for a request with more choices than the engine can ever hold at once (a 429 would invite retries)."""
    capacity = settings.max_num_seqs + settings.max_queue
    if num_prompts * n > capacity:
        raise InvalidRequestError(
            f"{num_prompts} prompt(s) x {n} samples (n or best_of) makes {num_prompts * n} sequences, more than "
            f"the server can ever hold ({capacity}: --max-num-seqs + --max-queue); split the request",
            param="n",
        )


def _temperature(requested: float | None, default: float) -> float:
    if requested is None:
        return default
    return 0.0 if requested < GREEDY_BELOW else requested


def _logprobs(body: GenerationRequest) -> int | None:
    """Alternatives to report per token; best_of ranks its samples by their tokens' log-probabilities, so asks too."""
    wanted = body.wanted_logprobs()
    ranks = body.samples_per_prompt() > (body.n or 1)
    return 0 if wanted is None and ranks else wanted


def _default_max_tokens(body: GenerationRequest, prompt_len: int, max_model_len: int) -> int:
    # At least 1, so that a prompt that fills the context is refused by the engine with both numbers named.
    left = max(max_model_len - prompt_len, 1)
    return left if body.default_max_tokens is None else min(body.default_max_tokens, left)
