"""The synchronous engine core: schedule → run → postprocess, one step at a time, on the engine thread."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from server.adapters.cache import AdapterSlots
from server.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from server.engine.generation_defaults import GenerationDefaults
from server.engine.logprobs import TokenLogprob
from server.engine.merge_controller import MergeController
from server.engine.outputs import RequestOutput, engine_error, joined
from server.engine.runner import ModelRunner, StepResult
from server.engine.sampler import INVALID_TOKEN, GeneratorFactory, SamplingRow
from server.engine.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from server.engine.sequence import FinishReason, SamplingParams, Sequence
from server.engine.speculative.config import SpeculativeConfig
from server.engine.speculative.proposer import Proposer
from server.engine.speculative.speculator import Speculator
from server.engine.structured import GrammarCompiler, GrammarState

log = logging.getLogger(__name__)


@dataclass
class RequestState:
    """Per-request state the engine keeps next to the scheduler's Sequence."""

    seq: Sequence
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher
    grammar: GrammarState | None = None  # for requests with structured outputs


class LLMEngine:
    """Adds and aborts requests and advances all of them by one step per `step()` call.

    A request owns its failures: whatever fails for it alone (adding it, its adapter slot, its sampling row, its
    numbers, its text) ends it with an error output, frees its KV blocks and adapter slot, and leaves the others'
    outputs as they would have been. A failure of the step itself (the forward) ends the requests of that step and
    leaves nothing behind that could fail the next one.
    """

    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        tokenizer,
        server_seed: int,
        adapters: AdapterSlots,
        merger: MergeController,
        generation_defaults: GenerationDefaults | None = None,
        speculative: SpeculativeConfig | None = None,
        proposer: Proposer | None = None,
    ) -> None:
        self.runner = runner
        self.generation_defaults = generation_defaults or GenerationDefaults()  # what requests that omit fields get
        self.adapters = adapters
        self.merger = merger
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.generators = GeneratorFactory(server_seed)
        self.grammars = GrammarCompiler(tokenizer, runner.loaded.spec.vocab_size, runner.loaded.spec.eos_token_ids)
        self.eos_token_ids = frozenset(runner.loaded.spec.eos_token_ids)
        self.max_model_len = scheduler.config.max_model_len
        self.speculator = None if speculative is None else Speculator(speculative, self.max_model_len, proposer)
        self.requests: dict[str, RequestState] = {}
        self.last_step_tokens = 0  # tokens (prefill + decode) the latest step computed, for the metrics
        self.last_step_failed = False  # the latest step failed as a whole, for health and metrics
        self.num_request_failures = 0  # requests that ended with an error, since start

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None,
        arrival_time: float | None = None,
    ):  # fmt: skip
        """Queue a request. Everything that can fail for it is built before the scheduler sees it, so a failure
        here raises and leaves nothing behind. `arrival_time` (monotonic) orders it in the queue; now if None."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id} is already running")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        seq = Sequence(request_id, list(prompt_token_ids), params, adapter, arrival_time=arrival)
        generator = None if params.greedy else self.generators.create(params.seed)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids)
        grammar = None if params.structured is None else self.grammars.start(params.structured)
        state = RequestState(seq, generator, detok, StopStringMatcher(params.stop), grammar)
        self.scheduler.add(seq)
        self.requests[request_id] = state

    def abort(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is not None:
            self._finish(state.seq, FinishReason.CANCELLED)

    def fail_all(self, reason: str) -> list[RequestOutput]:
        """End every request with an error (after a fault the engine cannot pin on some of them); free everything."""
        seqs = [state.seq for state in self.requests.values()]
        orphans = [s for s in (*self.scheduler.running, *self.scheduler.waiting) if s.request_id not in self.requests]
        return [out for seq in (*seqs, *orphans) for out in self._fail(seq, reason)]

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, append sampled tokens and report what each sampled request produced.

        Never raises: failures end the requests they concern (see the class docstring); `last_step_failed` tells
        whether the step failed as a whole.
        """
        self.last_step_failed = False
        try:
            return self._step()
        except Exception:
            log.exception("engine step failed outside the forward; failing every request")
            self.last_step_failed = True
            return self.fail_all("the engine step failed")

    def _step(self) -> list[RequestOutput]:
        self._update_merge()
        if self.speculator is not None:
            self.speculator.propose(
                self.scheduler.running,
                bool(self.scheduler.waiting),
                self._may_speculate,
                self._generator_of,
                self._grammar_of,
            )
        plan = self.scheduler.schedule()
        self.last_step_tokens = plan.num_batched_tokens
        for seq in plan.preempted:
            seq.draft_token_ids = []
            self._unbind(seq)
        outputs = self._prepare(plan)
        if plan.is_empty:
            return outputs
        try:
            step = self.runner.execute(plan.scheduled, self._sampling_row, self.merger.merged)
        except Exception:
            log.exception("engine step failed; failing the %d requests of the step", len(plan.scheduled))
            self.last_step_failed = True
            return outputs + [out for item in plan.scheduled for out in self._fail(item.seq, "its step failed")]
        self.scheduler.advance(plan)
        outputs += self._postprocess(step)
        if self.speculator is not None:
            self.speculator.end_step(plan.scheduled, sum(len(out.token_ids) for out in outputs))
        return outputs

    def speculation_counts(self) -> list[tuple[str | None, int, int]]:
        """Proposed and accepted tokens per adapter name since the previous call (none without speculation)."""
        return [] if self.speculator is None else self.speculator.take_counts()

    def _may_speculate(self, seq: Sequence) -> bool:
        return seq.request_id in self.requests and seq.params.speculative

    def _grammar_of(self, seq: Sequence) -> GrammarState | None:
        state = self.requests.get(seq.request_id)
        return None if state is None else state.grammar

    def _draft_grammars(self, seq: Sequence) -> tuple[GrammarState, ...]:
        return () if self.speculator is None else self.speculator.draft_grammars.get(seq.request_id, ())

    def _generator_of(self, seq: Sequence) -> torch.Generator | None:
        state = self.requests.get(seq.request_id)
        return None if state is None else state.generator

    def _update_merge(self) -> None:
        """Merged-mode swaps happen here, between steps. One that fails (out of memory for the merged weights, say)
        leaves the base weights serving and every adapter unmerged, which is slower but exact."""
        try:
            self.merger.update(self.scheduler)
        except Exception:
            log.exception("a merged-mode swap failed; serving every adapter unmerged")
            self.merger.weight_merger.unmerge()
            self.merger.merged = None

    def _prepare(self, plan: SchedulerOutput) -> list[RequestOutput]:
        """Stamp first scheduling and bind adapter slots; a sequence that cannot run leaves the step, failed."""
        now = time.monotonic()
        outputs, kept = [], []
        for item in plan.scheduled:
            seq = item.seq
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            if seq.request_id not in self.requests:  # an engine bug; dropping it keeps the next steps sound
                outputs += self._fail(seq, "the scheduler held a sequence with no request")
                continue
            try:
                if seq.adapter is not None and seq.adapter_slot is None:
                    seq.adapter_slot = self.adapters.bind_slot(seq.adapter)
            except Exception as exc:
                outputs += self._fail(seq, "its adapter could not be put in a device slot", exc)
                continue
            kept.append(item)
        plan.scheduled = kept
        return outputs

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        try:
            self.scheduler.finish(seq, reason)
        finally:
            self._unbind(seq)
            if self.speculator is not None:
                self.speculator.finish(seq, reason)

    def _fail(self, seq: Sequence, reason: str, exc: BaseException | None = None) -> list[RequestOutput]:
        """End one request with an error: the log has the detail under its id, the client a generic message."""
        log.error("request %s failed: %s", seq.request_id, reason, exc_info=exc)
        self.num_request_failures += 1
        state = self.requests.pop(seq.request_id, None)
        self._finish(seq, FinishReason.ERROR)
        if state is None:
            return []
        return [self._output(state, "", [], FinishReason.ERROR, error=engine_error(seq.request_id))]

    def _unbind(self, seq: Sequence) -> None:
        if seq.adapter_slot is not None:
            self.adapters.unbind_slot(seq.adapter)
            seq.adapter_slot = None

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        state = self.requests[seq.request_id]
        return SamplingRow(
            seq.params, state.generator, seq.num_output_tokens, seq.prompt_token_ids, seq.output_token_ids,
            seq.request_id, state.grammar, self._draft_grammars(seq),
        )  # fmt: skip

    def _postprocess(self, step: StepResult) -> list[RequestOutput]:
        for request_id, scored in step.prompt_logprobs.items():
            if (state := self.requests.get(request_id)) is not None:
                state.seq.prompt_logprobs.extend(scored)
        outputs = []
        for item, sampled in step.sampled:
            state = self.requests.get(item.seq.request_id)
            if state is not None:
                outputs += self._take_tokens(state, item, sampled, step.logprobs.get(item.seq.request_id, []))
        return outputs

    def _take_tokens(
        self, state: RequestState, item: ScheduledSequence, sampled: list[int], logprobs: list[TokenLogprob]
    ) -> list[RequestOutput]:
        """Append the tokens `item` keeps (one, or the accepted proposals and the bonus token), one at a time so
        that stop strings, EOS and max_tokens end it exactly where decoding token by token would; one output."""
        seq = item.seq
        kept = sampled
        if item.num_draft and self.speculator is not None:
            kept = self.speculator.verify(item, sampled, state.generator)
        pieces: list[RequestOutput] = []
        for token in kept:
            if token == INVALID_TOKEN:
                return self._fail(seq, "sampling failed: non-finite logits or probabilities, or its generator")
            if state.grammar is not None and not state.grammar.accept(token):
                return self._fail(seq, f"its grammar refused token {token}: {state.grammar.error}")
            try:
                scored = seq.params.max_tokens == 0
                pieces.append(self._score_only(state) if scored else self._append_token(state, token))
            except Exception as exc:
                return self._fail(seq, "turning its token into its output failed", exc)
            if pieces[-1].finished:
                break
        if item.num_draft and not pieces[-1].finished:
            Speculator.roll_back(seq, len(kept) - 1, self.scheduler.block_manager)
        return [self._with_logprobs(joined(pieces), seq, logprobs)]

    def _score_only(self, state: RequestState) -> RequestOutput:
        """End a `max_tokens: 0` request (prompt scoring) once its prompt is computed; its sampled token is dropped."""
        self._finish(state.seq, FinishReason.LENGTH)
        del self.requests[state.seq.request_id]
        return self._output(state, "", [], FinishReason.LENGTH)

    @staticmethod
    def _with_logprobs(out: RequestOutput, seq: Sequence, sampled: list[TokenLogprob]) -> RequestOutput:
        if sampled and out.token_ids:
            out.logprobs = sampled[: len(out.token_ids)]
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
            num_cached_tokens=seq.num_cached_tokens or 0,
        )
