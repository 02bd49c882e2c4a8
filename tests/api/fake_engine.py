"""A small deterministic stand-in for the AsyncEngine facade, for testing the HTTP layer.

Its tokenizer maps each character to its code point. Its "model" echoes the prompt back one token per step and
then emits end-of-sequence, so finish reasons are predictable: a prompt longer than max_tokens ends with "length",
a shorter one with "stop". It honours stop strings, min_tokens and ignore_eos, and records what it was asked and
which requests were cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server.engine.generation_defaults import GenerationDefaults
from server.engine.logprobs import TokenLogprob
from server.engine.outputs import ModelCard, RequestOutput
from server.engine.penalties import validate_token_ids
from server.engine.request import Job, SamplingRequest
from server.engine.sequence import FinishReason, SamplingParams
from server.engine.structured import GrammarSpec, check_grammar
from server.errors import InvalidRequestError, QueueFullError, model_not_found


@dataclass
class Submitted:
    """One call of generate, as the engine saw it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None


@dataclass
class FakeEngine:
    """Implements the facade's methods; flip the public fields to make it refuse, stall or fail."""

    served_model_name: str = "base-model"
    max_model_len: int = 128
    vocab_size: int = 300
    adapters: tuple[str, ...] = ("sql-writer", "poet")
    ready: bool = True
    queue_full: bool = False
    step_delay_s: float = 0.0
    fail_after: int | None = None  # report an engine error after this many tokens
    problem: str | None = None  # what health_problem reports
    generation_defaults: GenerationDefaults = field(default_factory=GenerationDefaults)  # the model's, if any
    submitted: list[Submitted] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    compiled: list[GrammarSpec] = field(default_factory=list)
    shut_down: bool = False
    chat_template: str | None = None  # only what tool-call formats are chosen by: the rendering below is fixed

    def is_ready(self) -> bool:
        return self.ready

    def health_problem(self) -> str | None:
        return self.problem

    def list_models(self) -> list[ModelCard]:
        defaults = self.generation_defaults.as_dict()
        base = ModelCard(self.served_model_name, None, 1_700_000_000, defaults)
        return [base, *(ModelCard(a, self.served_model_name, 1_700_000_001, defaults) for a in self.adapters)]

    def plan(self, request: SamplingRequest, prompts: list[list[int]]) -> list[Job]:
        return request.jobs(prompts, self.max_model_len, self.generation_defaults)

    def resolve_adapter(self, model: str) -> str | None:
        if model == self.served_model_name:
            return None
        if model in self.adapters:
            return model
        raise model_not_found(model)

    def encode_prompt(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in prompt]

    def compile_grammar(self, spec: GrammarSpec) -> None:
        check_grammar(spec)
        self.compiled.append(spec)

    def decode(self, token_ids: list[int]) -> str:
        return "".join(map(chr, token_ids))

    def decode_tokens(self, token_ids: list[int]) -> list[str]:
        return [chr(token) for token in token_ids]

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
        tools: list[dict] | None = None,  # its template ignores tools, as many do
        template_kwargs: dict | None = None,  # and every variable
    ) -> list[int]:
        if messages[-1]["role"] == "assistant":
            raise InvalidRequestError("the last message must not be the assistant's", param="messages")
        rendered = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return self.encode_prompt(rendered + ("<assistant>" if add_generation_prompt else ""))

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        validate_token_ids(params, self.vocab_size)
        if self.queue_full:
            raise QueueFullError("the request queue is full", retry_after_s=7)
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(prompt_token_ids)} tokens) plus max_tokens ({params.max_tokens}) is over "
                f"the model's context of {self.max_model_len}",
                param="max_tokens",
            )
        self.submitted.append(Submitted(request_id, prompt_token_ids, params, adapter))
        text, reason = _reply("".join(map(chr, prompt_token_ids)), params)
        pieces = list(text) or [""]  # a stop string at the very start still ends with one (empty) output
        finished = False
        try:
            for i, piece in enumerate(pieces):
                await asyncio.sleep(self.step_delay_s)
                error = "device fell over" if self.fail_after is not None and i >= self.fail_after else None
                finished = i == len(pieces) - 1 or error is not None
                token_ids = [ord(c) for c in piece]
                yield RequestOutput(
                    request_id=request_id,
                    text=piece,
                    token_ids=token_ids,
                    num_prompt_tokens=len(prompt_token_ids),
                    num_output_tokens=min(i + 1, params.max_tokens),
                    finished=finished,
                    finish_reason=(FinishReason.ERROR if error else reason) if finished else None,
                    error=error,
                    logprobs=_scores(token_ids, params.logprobs, params.seed),
                    prompt_logprobs=_scores(prompt_token_ids[1:], params.prompt_logprobs, None) if i == 0 else None,
                )
                if error:
                    return
        finally:
            if not finished:
                self.cancelled.append(request_id)

    def shutdown(self) -> None:
        self.shut_down = True


def _scores(token_ids: list[int], num_top: int | None, seed: int | None) -> list[TokenLogprob] | None:
    """Made-up log-probabilities: -0.25 per token (times 1 + seed % 3 when seeded, to tell best_of samples apart),
    alternatives the next code points at -1, -2, ..."""
    if num_top is None:
        return None
    value = -0.25 * (1 + (seed or 0) % 3)
    return [TokenLogprob(t, value, tuple((t + 1 + j, -1.0 - j) for j in range(num_top))) for t in token_ids]


def _reply(prompt: str, params: SamplingParams) -> tuple[str, FinishReason]:
    """The echo model's whole output and why it ends."""
    natural = float("inf") if params.ignore_eos else max(len(prompt), params.min_tokens)
    length = int(min(natural, params.max_tokens))
    text = (prompt * (length // len(prompt) + 1))[:length]
    reason = FinishReason.STOP if natural <= params.max_tokens else FinishReason.LENGTH
    for stop in params.stop:
        if stop in text:
            text, reason = text[: text.index(stop)], FinishReason.STOP
    return text, reason
