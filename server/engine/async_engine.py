"""The engine facade: the only thing the API touches. One engine thread owns the model and the device;
asyncio callers hand it work through a queue and get their tokens streamed back on their event loop."""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import TypeVar

from server.adapters.registry import AdapterRegistry
from server.adapters.versions import adapter_name
from server.engine.adapter_facade import AdapterFacade
from server.engine.health import EngineHealth, HealthLimits
from server.engine.inbox import Abort, Call, Submit, hand_over
from server.engine.llm_engine import LLMEngine
from server.engine.outputs import ModelCard, RequestOutput, engine_error
from server.engine.penalties import validate_token_ids
from server.engine.request import Job, SamplingRequest
from server.engine.sequence import SamplingParams
from server.engine.structured import GrammarSpec
from server.errors import (
    InvalidRequestError,
    LoraplexError,
    QueueFullError,
    ServiceUnavailableError,
    model_not_found,
)
from server.metrics import Metrics, RequestTrace
from server.settings import Settings
from server.threads import use_engine_threads

log = logging.getLogger(__name__)

_T = TypeVar("_T")
Build = Callable[[], tuple[LLMEngine, AdapterRegistry, str]]  # the engine core, its adapters, the base model's name


class AsyncEngine(AdapterFacade):
    """Thread-safe facade over LLMEngine: submit, stream, cancel, and what /v1/models lists; the adapters' way in
    through `AdapterFacade`."""

    def __init__(self, build: Build, settings: Settings, metrics: Metrics) -> None:
        """Start the engine thread, which builds the core, adapter registry and served model name; wait for it.

        The engine thread is the only one that computes with every core (`server.threads`), so the model is
        loaded there too. Whatever `build` raises is raised here.
        """
        self.metrics = metrics
        self.max_queue = settings.max_queue
        self.max_num_seqs = settings.max_num_seqs
        self.max_loras = settings.max_loras  # how deep into the queue the device-slot prefetch looks
        self.created = int(time.time())
        self._inbox: queue.SimpleQueue[Submit | Abort | Call | None] = queue.SimpleQueue()
        self._subscribers: dict[str, Submit] = {}
        self._in_flight = 0  # submitted and not yet finished; changed on the event loop only
        self._stopped = threading.Event()
        self.health = EngineHealth(HealthLimits.from_settings(settings))
        self._inbox_lock = threading.Lock()  # a submission either reaches a running thread or is refused
        self._failures_recorded = 0  # the core's request failures already counted in the metrics
        started: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(build, started), name="loraplex-engine", daemon=True)
        self._thread.start()
        started.result()  # the engine thread has set self.core, self.adapters and self.served_model_name
        self.tokenizer = self.core.tokenizer
        self.chat_template: str | None = self.tokenizer.chat_template  # what the API reads tool-call formats from
        metrics.set_base_model(self.served_model_name)
        self.max_model_len = self.core.max_model_len
        self.generation_defaults = self.core.generation_defaults
        self.vocab_size = self.core.runner.loaded.spec.vocab_size

    def is_ready(self) -> bool:
        return self._thread.is_alive() and not self._stopped.is_set() and self.health.stopped is None

    def health_problem(self) -> str | None:
        """Why the engine is unhealthy (stopped, failing its steps, stalled), or None."""
        return self.health.problem(self._thread.is_alive())

    def list_models(self) -> list[ModelCard]:
        """The base model, then every adapter in the store (loaded or not)."""
        defaults = self.generation_defaults.as_dict()
        base = ModelCard(self.served_model_name, None, self.created, defaults)
        adapters = self.adapters.listing()
        return [base, *(ModelCard(name, self.served_model_name, created, defaults) for name, created in adapters)]

    def plan(self, request: SamplingRequest, prompts: list[list[int]]) -> list[Job]:
        """The request's jobs, one per (prompt, sample), with the model's generation defaults filled in."""
        return request.jobs(prompts, self.max_model_len, self.generation_defaults)

    def resolve_adapter(self, model: str) -> str | None:
        """None for the base model, the adapter name for an adapter in the store; 404 otherwise."""
        if model == self.served_model_name:
            return None
        if self.adapters.exists(model):
            return model
        raise model_not_found(model)

    def encode_prompt(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)

    def compile_grammar(self, spec: GrammarSpec) -> None:
        """Compile (or find cached) a request's output constraint; a 400 naming the problem if it cannot compile.

        Blocking (a large schema takes a while, the first one also builds the grammar tokenizer): call it off the
        event loop, before the request is queued.
        """
        self.core.grammars.compile(spec)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def decode_tokens(self, token_ids: list[int]) -> list[str]:
        """Each token's text decoded on its own (how log-probabilities name tokens)."""
        return self.tokenizer.batch_decode([[token] for token in token_ids])

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        add_special_tokens: bool = False,
        tools: list[dict] | None = None,
        template_kwargs: dict | None = None,
    ) -> list[int]:
        """The conversation (and the tools it may call) rendered by the chat template, which already holds the
        special tokens, tokenized; `template_kwargs` are further template variables (`enable_thinking`...)."""
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False,
                **(template_kwargs or {}),
            )  # fmt: skip
        except Exception as exc:  # jinja templates raise arbitrary errors on bad conversations
            msg = f"the messages do not fit the model's chat template: {exc}"
            raise InvalidRequestError(msg, param="messages") from exc
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the iteration early cancels it inside the engine."""
        self._validate(prompt_token_ids, params)
        if not self.is_ready():
            raise ServiceUnavailableError("the engine is not running")
        if self._in_flight >= self.max_num_seqs + self.max_queue:
            raise QueueFullError(
                f"{self._in_flight} requests are in flight and the queue holds {self.max_queue}; retry shortly",
                retry_after_s=1,
            )
        arrival = time.monotonic()  # its place in the queue, kept while its adapter loads
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._in_flight += 1
        trace = RequestTrace(len(prompt_token_ids))  # TTFT and queue time include a cold adapter's load
        submitted = finished = False
        key = None  # the adapter version this request runs with, held until it ends
        try:
            if adapter is not None:  # loads on arrival, off the engine thread; the batch runs on without it
                key = await self.adapters.acquire(adapter)
            self._post(Submit(request_id, prompt_token_ids, params, key, loop, outputs.put_nowait, arrival))
            submitted = True
            while not finished:
                out = await outputs.get()
                finished = out.finished
                reason = out.finish_reason.value if finished and out.finish_reason else None
                trace.on_output(len(out.token_ids), out.scheduled_time, reason)
                trace.num_cached_tokens = out.num_cached_tokens
                yield out
        finally:
            self._in_flight -= 1
            if not finished:
                self._inbox.put(Abort(request_id))
            if key is not None:
                self.adapters.release(key)
            if submitted:
                self.metrics.record_request(adapter or self.served_model_name, trace)

    def shutdown(self) -> None:
        self._stopped.set()
        self._inbox.put(None)
        self._thread.join(timeout=30)
        self.adapters.shutdown()

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_token_ids(params, self.vocab_size)
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty; send at least one token", param="prompt")
        bad = next((t for t in prompt_token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(
                f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", param="prompt"
            )
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_token_ids)} tokens and max_tokens is {params.max_tokens}: together "
                f"{total}, over the model's context length {self.max_model_len}; shorten the prompt or lower "
                "max_tokens",
                param="max_tokens",
            )

    async def call(self, fn: Callable[[LLMEngine], _T]) -> _T:
        """Run `fn(core)` on the engine thread between two steps and return its result (or raise its error).

        The way to touch the model from outside, e.g. for a tool or a benchmark that times work where it runs.
        """
        future: Future[_T] = Future()
        self._post(Call(fn, future))
        return await asyncio.wrap_future(future)

    def _post(self, command: Submit | Call) -> None:
        """Hand work to the engine thread, or refuse it once the thread has stopped (it would never be answered)."""
        with self._inbox_lock:
            if self.health.stopped is not None:
                raise ServiceUnavailableError(self.health.stopped)
            self._inbox.put(command)

    def _run(self, build: Build, started: Future[None]) -> None:
        use_engine_threads()
        try:
            self.core, self.adapters, self.served_model_name = build()
        except BaseException as exc:
            started.set_exception(exc)
            return
        started.set_result(None)
        reason = "the engine has shut down"
        try:
            self._loop()
        except BaseException:
            log.exception("the engine thread died")
            reason = "the engine thread stopped after an internal error; the server log has the details"
        finally:
            self._stop(reason)

    def _stop(self, reason: str) -> None:
        """Refuse new work and end every request still waiting for outputs, so no caller waits forever."""
        with self._inbox_lock:
            self.health.stop(reason)
        while not self._inbox.empty():  # nothing enters it any more
            command = self._inbox.get()
            if isinstance(command, Call):
                command.future.set_exception(ServiceUnavailableError(reason))
            elif isinstance(command, Submit):
                self._subscribers[command.request_id] = command
        for sub in self._subscribers.values():
            hand_over(sub.loop, [(sub.put, sub.error(f"request {sub.request_id} ended: {reason}"))])
        self._subscribers.clear()

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                if not self._drain(block=not self.core.has_work):
                    break
                if self.core.has_work:
                    self._prefetch_slot()
                    self._step()
                else:
                    self._record_state()  # aborts can empty the engine without a step
            except Exception:  # a fault between steps: end every request rather than the engine thread
                log.exception("the engine loop failed; failing every request")
                self._finish_step(self.core.fail_all("the engine loop failed"), failed=True)

    def _drain(self, block: bool) -> bool:
        """Apply queued submissions and aborts; False once shutdown was requested."""
        while True:
            if block:
                self.health.going_idle()
            try:
                command = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if block:
                self.health.woke()
            block = False
            if command is None:
                return False
            if isinstance(command, Abort):
                self.core.abort(command.request_id)
                self._subscribers.pop(command.request_id, None)
                continue
            if isinstance(command, Call):
                command.run(self.core)
                continue
            try:
                self.core.add_request(
                    command.request_id, command.prompt_token_ids, command.params, command.adapter, command.arrival_time
                )
            except Exception as exc:
                log.exception("request %s failed: it could not be added", command.request_id)
                self.metrics.record_request_failures(1)
                message = exc.message if isinstance(exc, LoraplexError) else engine_error(command.request_id)
                hand_over(command.loop, [(command.put, command.error(message))])
                continue
            self._subscribers[command.request_id] = command

    def _prefetch_slot(self) -> None:
        """Copy the adapter of the first waiting request that lacks one into a free device slot, ahead of its
        admission: one per step, so a copy never lengthens the gap between two steps by more than one adapter.
        Best effort: a failure here is the request's own to meet when it binds its slot."""
        cache = self.adapters.cache
        if not cache.free_slots():
            return
        waiting = itertools.islice(self.core.scheduler.waiting, self.max_loras)
        try:
            for key in dict.fromkeys(seq.adapter for seq in waiting if seq.adapter is not None):
                if cache.prefetch_slot(key):
                    return
        except Exception:
            log.exception("prefetching an adapter into a device slot failed")

    def _step(self) -> None:
        start = time.perf_counter()
        outputs = self.core.step()  # contains its own failures, see LLMEngine
        if self.core.last_step_tokens:
            self.metrics.record_step(time.perf_counter() - start, self.core.last_step_tokens)
            self.metrics.record_speculation(self.core.speculation_counts())
        self._finish_step(outputs, self.core.last_step_failed)

    def _finish_step(self, outputs: list[RequestOutput], failed: bool) -> None:
        """Note the step's health, update the gauges and hand the outputs to their callers."""
        self.health.step_done(failed)
        if failed:
            self.metrics.record_step_failure()
        failures = self.core.num_request_failures
        self.metrics.record_request_failures(failures - self._failures_recorded)
        self._failures_recorded = failures
        self._record_state()
        # One wake-up per caller loop and step, not one per token: a cross-thread wake-up costs the
        # engine thread the GIL, which measured 2-3x slower steps at batch 32 when done per output.
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            sub = self._subscribers.pop(out.request_id, None) if out.finished else self._subscribers.get(out.request_id)
            if sub is not None:
                batches.setdefault(sub.loop, []).append((sub.put, out))
        for loop, items in batches.items():
            hand_over(loop, items)

    def _record_state(self) -> None:
        scheduler = self.core.scheduler
        self.metrics.record_scheduler_state(
            scheduler.num_running,
            scheduler.num_waiting,
            scheduler.block_manager.usage,
            {adapter_name(key) for key in scheduler.running_adapters},  # names, not versions, in labels
            {adapter_name(key) for key in scheduler.waiting_adapters},
        )
        self.metrics.set_adapter_slot_users(self.adapters.cache.slot_users())
