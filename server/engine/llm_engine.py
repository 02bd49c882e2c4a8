"""The synchronous engine core: schedule → run → postprocess, one step at a time, on the engine thread."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from server.adapters.registry import AdapterRegistry
from server.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from server.engine.logprobs import TokenLogprob
from server.engine.merge_controller import MergeController
from server.engine.outputs import RequestOutput
from server.engine.runner import ModelRunner, StepResult
from server.engine.sampler import GeneratorFactory, SamplingRow
from server.engine.scheduler import Scheduler
from server.engine.sequence import FinishReason, SamplingParams, Sequence

log = logging.getLogger(__name__)


@dataclass
class RequestState:
    """Per-request state the engine keeps next to the scheduler's Sequence."""

    seq: Sequence
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher


class LLMEngine:
    """Adds and aborts requests and advances all of them by one step per `step()` call."""

    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        tokenizer,
        server_seed: int,
        adapters: AdapterRegistry,
        merger: MergeController,
    ) -> None:
        self.runner = runner
        self.adapters = adapters
        self.merger = merger
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.generators = GeneratorFactory(server_seed)
        self.eos_token_ids = frozenset(runner.loaded.spec.eos_token_ids)
        self.max_model_len = scheduler.config.max_model_len
        self.requests: dict[str, RequestState] = {}
        self.last_step_tokens = 0  # tokens (prefill + decode) the latest step computed, for the metrics

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None):
        seq = Sequence(request_id, list(prompt_token_ids), params, adapter, arrival_time=time.monotonic())
        self.scheduler.add(seq)
        generator = None if params.greedy else self.generators.create(params.seed)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids)
        self.requests[request_id] = RequestState(seq, generator, detok, StopStringMatcher(params.stop))

    def abort(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is not None:
            self._finish(state.seq, FinishReason.CANCELLED)

    def fail_all(self, message: str) -> list[RequestOutput]:
        """Finish every request with an error (after an engine fault); their KV blocks and slots are freed."""
        outputs = []
        for request_id, state in list(self.requests.items()):
            self._finish(state.seq, FinishReason.ERROR)
            outputs.append(self._output(state, "", [], FinishReason.ERROR, error=message))
            del self.requests[request_id]
        return outputs

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, append sampled tokens and report what each sampled request produced."""
        self.merger.update(self.scheduler)  # merged-mode swaps happen here, between steps
        plan = self.scheduler.schedule()
        self.last_step_tokens = plan.num_batched_tokens
        for seq in plan.preempted:
            self._unbind(seq)
        if plan.is_empty:
            return []
        now = time.monotonic()
        for item in plan.scheduled:
            if item.seq.first_scheduled_time is None:
                item.seq.first_scheduled_time = now
            if item.seq.adapter is not None and item.seq.adapter_slot is None:
                item.seq.adapter_slot = self.adapters.bind_slot(item.seq.adapter)
        step = self.runner.execute(plan.scheduled, self._sampling_row, self.merger.merged)
        self.scheduler.advance(plan)
        return self._postprocess(step)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(seq, reason)
        self._unbind(seq)

    def _unbind(self, seq: Sequence) -> None:
        if seq.adapter_slot is not None:
            self.adapters.unbind_slot(seq.adapter)
            seq.adapter_slot = None

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        generator = self.requests[seq.request_id].generator
        return SamplingRow(seq.params, generator, seq.num_output_tokens, seq.prompt_token_ids, seq.output_token_ids)

    def _postprocess(self, step: StepResult) -> list[RequestOutput]:
        for request_id, scored in step.prompt_logprobs.items():
            if (state := self.requests.get(request_id)) is not None:
                state.seq.prompt_logprobs.extend(scored)
        outputs = []
        for item, token in step.sampled:
            state = self.requests.get(item.seq.request_id)
            if state is not None:
                out = self._score_only(state) if item.seq.params.max_tokens == 0 else self._append_token(state, token)
                outputs.append(self._with_logprobs(out, state.seq, step.logprobs.get(item.seq.request_id)))
        return outputs

    def _score_only(self, state: RequestState) -> RequestOutput:
        """End a `max_tokens: 0` request (prompt scoring) once its prompt is computed; its sampled token is dropped."""
        self._finish(state.seq, FinishReason.LENGTH)
        del self.requests[state.seq.request_id]
        return self._output(state, "", [], FinishReason.LENGTH)

    @staticmethod
    def _with_logprobs(out: RequestOutput, seq: Sequence, sampled: TokenLogprob | None) -> RequestOutput:
        if sampled is not None and out.token_ids:
            out.logprobs = [sampled]
        if seq.params.prompt_logprobs is not None and seq.num_output_tokens <= 1:  # the request's first output
            out.prompt_logprobs = seq.prompt_logprobs
        return out

    def _append_token(self, state: RequestState, token: int) -> RequestOutput:
        seq = state.seq
        seq.output_token_ids.append(token)
        # The sampler bans EOS and stop token ids before min_tokens.
        if (token in self.eos_token_ids and not seq.params.ignore_eos) or token in seq.params.stop_token_ids:
            text, _ = self._final_text(state)
            reason: FinishReason | None = FinishReason.STOP
        else:
            text, stopped = state.stops.feed(state.detokenizer.push([token]))
            reason = FinishReason.STOP if stopped else self._length_reason(seq)
            if reason is FinishReason.LENGTH:
                tail, stopped = self._final_text(state)
                text += tail
                reason = FinishReason.STOP if stopped else reason
        if reason is not None:
            self._finish(seq, reason)
            del self.requests[seq.request_id]
        return self._output(state, text, [token], reason)

    @staticmethod
    def _final_text(state: RequestState) -> tuple[str, bool]:
        """Release the text held back at the end of the stream; True when it completes a stop string."""
        text, stopped = state.stops.feed(state.detokenizer.flush())
        return (text, True) if stopped else (text + state.stops.flush(), False)

    def _length_reason(self, seq: Sequence) -> FinishReason | None:
        if seq.num_output_tokens >= seq.params.max_tokens or len(seq) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    @staticmethod
    def _output(state: RequestState, text, token_ids, reason: FinishReason | None, error=None) -> RequestOutput:
        seq = state.seq
        return RequestOutput(
            request_id=seq.request_id,
            text=text,
            token_ids=token_ids,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            finished=reason is not None,
            finish_reason=reason,
            error=error,
            scheduled_time=seq.first_scheduled_time,
        )
