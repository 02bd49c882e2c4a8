"""The one place where errors become HTTP responses in the OpenAI error shape, each counted by status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from server.errors import AuthenticationError, InvalidRequestError, LoraplexError, NotFoundError, QueueFullError
from server.metrics import Metrics

logger = logging.getLogger(__name__)

# nginx's "client closed request": nobody reads it, but access logs tell it apart from a real answer.
CLIENT_CLOSED_REQUEST = 499


def error_response(exc: LoraplexError) -> JSONResponse:
    """The HTTP response for a user-facing error, with Retry-After when the queue is full and the auth scheme on 401."""
    headers = None
    if isinstance(exc, QueueFullError):
        headers = {"Retry-After": str(exc.retry_after_s)}
    elif isinstance(exc, AuthenticationError):
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=headers)


async def send_error(scope: Scope, receive: Receive, send: Send, exc: LoraplexError) -> None:
    """Answer a raw ASGI request with `exc`: for middleware, which runs outside the exception handlers."""
    await _counted(scope["app"], error_response(exc))(scope, receive, send)


def _counted(app: FastAPI, response: Response) -> Response:
    """Count an error response in `request_errors_total` by its status, then return it."""
    metrics: Metrics = app.state.metrics
    metrics.record_http_error(response.status_code)
    return response


def validation_error(exc: RequestValidationError) -> InvalidRequestError:
    """Turn FastAPI's validation report into one 400 error naming the first offending field."""
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return InvalidRequestError(f"request body is not valid JSON: {first['ctx']['error']}")
    param = _param_path(first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ")
    if param is None and isinstance(first.get("input"), bytes):
        return InvalidRequestError("request body must be JSON, sent with Content-Type: application/json")
    if param is None:
        return InvalidRequestError(f"request body must be a JSON object: {message}")
    return InvalidRequestError(f"{param}: {message}", param=param)


def _param_path(loc: tuple[str | int, ...]) -> str | None:
    """`("body", "messages", 0, "content")` -> `"messages[0].content"`; None for the body itself."""
    parts = loc[1:] if loc and loc[0] == "body" else loc
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or None


async def _loraplex_error(request: Request, exc: LoraplexError) -> Response:
    if exc.status_code == 500:
        logger.error("%s %s failed: %s", request.method, request.url.path, exc.message)
    return _counted(request.app, error_response(exc))


async def _request_validation_error(request: Request, exc: RequestValidationError) -> Response:
    return _counted(request.app, error_response(validation_error(exc)))


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        return _counted(request.app, error_response(NotFoundError(f"no route for {request.method} {request.url.path}")))
    error = InvalidRequestError(str(exc.detail))
    return _counted(request.app, JSONResponse(error.to_dict(), status_code=exc.status_code, headers=exc.headers))


async def _client_disconnect(request: Request, exc: ClientDisconnect) -> Response:
    logger.info("client disconnected from %s %s", request.method, request.url.path)
    return _counted(request.app, Response(status_code=CLIENT_CLOSED_REQUEST))


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    # Starlette re-raises after this handler, so the server logs the traceback; the client learns nothing internal.
    return _counted(request.app, error_response(LoraplexError("internal server error")))


def install_error_handlers(app: FastAPI) -> None:
    """Register every exception handler of the API on `app`."""
    app.add_exception_handler(LoraplexError, _loraplex_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    app.add_exception_handler(Exception, _unexpected_error)
