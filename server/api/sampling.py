"""From a validated request body to the engine's SamplingRequest: a translation, the policy is the engine's.

Fields the client left out (or sent as null) stay None, so that the engine fills them from the model's generation
defaults (`server.engine.request`).
"""

from __future__ import annotations

from server.api.schemas import GenerationRequest
from server.engine.request import SamplingRequest
from server.engine.structured import GrammarSpec
from server.errors import InvalidRequestError
from server.settings import Settings


def sampling_request(body: GenerationRequest, structured: GrammarSpec | None = None) -> SamplingRequest:
    """The engine's request for `body`, with its compiled output constraint (if any)."""
    return SamplingRequest(
        n=body.n or 1,
        best_of=body.best_of,
        max_tokens=body.requested_max_tokens(),
        default_max_tokens=body.default_max_tokens,
        returns_prompt=body.allows_zero_max_tokens(),
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        seed=body.seed,
        stop=tuple(body.stop or ()),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        speculative=body.speculative,
        logprobs=body.wanted_logprobs(),
        prompt_logprobs=body.wanted_prompt_logprobs(),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=body.token_biases(),
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
