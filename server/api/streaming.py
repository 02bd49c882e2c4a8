"""Server-sent events: `data: {json}` per chunk, errors as an event, always ending with `data: [DONE]`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Send

from server.api.errors import error_body
from server.errors import LoraplexError

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


class EventStreamResponse(StreamingResponse):
    """A `text/event-stream` response that closes its event source however the stream ends."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncGenerator[BaseModel, None]) -> None:
        self._events = _events(chunks)
        super().__init__(self._events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_response(self, send: Send) -> None:
        # Closing the events closes the engine streams, which cancels their requests if the client went away.
        async with aclosing(self._events):
            await super().stream_response(send)


# Characters JSON leaves raw in strings that line splitters taking Unicode's view of a line break end a line at
# (Python's str.splitlines, and so httpx's `aiter_lines`); SSE ends lines at CR and LF alone, but a client reading
# the stream that way would get a data line cut in two. Escaped, the JSON means the same.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_json(payload: str) -> str:
    """A JSON text made safe for one `data:` line: the Unicode line breaks JSON leaves raw are escaped."""
    return payload.translate(_LINE_BREAKS)


def _data(payload: str) -> str:
    return f"data: {sse_json(payload)}\n\n"


async def _events(chunks: AsyncGenerator[BaseModel, None]) -> AsyncGenerator[str, None]:
    async with aclosing(chunks):
        try:
            async for chunk in chunks:
                yield _data(chunk.model_dump_json())
        except LoraplexError as exc:
            yield _data(json.dumps(error_body(exc)))
        except Exception:
            logger.exception("stream failed")
            yield _data(json.dumps(error_body(LoraplexError("internal server error"))))
    yield DONE
