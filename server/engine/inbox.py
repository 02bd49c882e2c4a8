"""What asyncio callers hand the engine thread (submissions, aborts, calls), and how outputs go back to them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.engine.outputs import RequestOutput
from server.engine.sequence import FinishReason, SamplingParams

if TYPE_CHECKING:
    from server.engine.llm_engine import LLMEngine

Delivery = tuple[Callable[[RequestOutput], None], RequestOutput]  # (the caller's put, an output for it)


@dataclass
class Submit:
    """A new request."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None  # adapter key (name@version), see server.adapters.versions
    loop: asyncio.AbstractEventLoop  # the caller's loop; outputs are handed over on it
    put: Callable[[RequestOutput], None]
    arrival_time: float | None = None  # time.monotonic() when the request arrived, before its adapter loaded

    def error(self, message: str) -> RequestOutput:
        """The one output of a request that ends with `message` before it produced anything."""
        return RequestOutput(self.request_id, "", [], len(self.prompt_token_ids), 0, True, FinishReason.ERROR, message)


@dataclass
class Abort:
    """Cancel a request."""

    request_id: str


@dataclass
class Call:
    """Run a function on the engine thread between two steps."""

    fn: Callable[[LLMEngine], Any]
    future: Future

    def run(self, core: LLMEngine) -> None:
        try:
            self.future.set_result(self.fn(core))
        except Exception as exc:
            self.future.set_exception(exc)


def hand_over(loop: asyncio.AbstractEventLoop, items: list[Delivery]) -> None:
    """Put `items` on their callers' queues from `loop`'s own thread, in one wake-up."""
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:  # the caller's loop has closed: nobody is left to read these outputs
        return


def _put_all(items: list[Delivery]) -> None:
    for put, out in items:
        put(out)
