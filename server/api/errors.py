"""The one place where errors become HTTP responses in the OpenAI error shape, each counted by status."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import compile_path
from starlette.types import Receive, Scope, Send

from server import errors
from server.metrics import Metrics

logger = logging.getLogger(__name__)

# nginx's "client closed request": nobody reads it, but access logs tell it apart from a real answer.
CLIENT_CLOSED_REQUEST = 499


@dataclass(frozen=True)
class HttpError:
    """How one domain error class is answered: its status code and OpenAI error type."""

    status: int
    type: str


# Every domain error's status, most specific class first where classes inherit (the first match in the MRO wins).
HTTP_ERRORS: dict[type[errors.LoraplexError], HttpError] = {
    errors.InvalidRequestError: HttpError(400, "invalid_request_error"),
    errors.AuthenticationError: HttpError(401, "authentication_error"),
    errors.PermissionDeniedError: HttpError(403, "permission_error"),
    errors.NotFoundError: HttpError(404, "not_found_error"),
    errors.ConflictError: HttpError(409, "conflict_error"),
    errors.PayloadTooLargeError: HttpError(413, "invalid_request_error"),
    errors.UnsupportedMediaError: HttpError(415, "invalid_request_error"),
    errors.ValidationError: HttpError(422, "invalid_request_error"),
    errors.QueueFullError: HttpError(429, "rate_limit_error"),
    errors.ServiceUnavailableError: HttpError(503, "service_unavailable_error"),
    # A configuration error reaching a request is the server's fault, not the client's.
    errors.ConfigurationError: HttpError(500, "internal_error"),
    errors.LoraplexError: HttpError(500, "internal_error"),
}


def http_error(error: type[errors.LoraplexError]) -> HttpError:
    """The status and type of an error class: its own entry, else its nearest ancestor's."""
    return next(HTTP_ERRORS[cls] for cls in error.__mro__ if cls in HTTP_ERRORS)


def status_of(error: type[errors.LoraplexError]) -> int:
    return http_error(error).status


def error_body(exc: errors.LoraplexError) -> dict:
    """The OpenAI error shape of `exc`."""
    kind = http_error(type(exc)).type
    return {"error": {"message": exc.message, "type": kind, "param": exc.param, "code": exc.code}}


def error_response(exc: errors.LoraplexError) -> JSONResponse:
    """The HTTP response for a user-facing error, with Retry-After when the queue is full and the auth scheme on 401."""
    headers = None
    if isinstance(exc, errors.QueueFullError):
        headers = {"Retry-After": str(exc.retry_after_s)}
    elif isinstance(exc, errors.AuthenticationError):
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(error_body(exc), status_code=status_of(type(exc)), headers=headers)


async def send_error(scope: Scope, receive: Receive, send: Send, exc: errors.LoraplexError) -> None:
    """Answer a raw ASGI request with `exc`: for middleware, which runs outside the exception handlers."""
    await _counted(scope["app"], error_response(exc))(scope, receive, send)


def _counted(app: FastAPI, response: Response) -> Response:
    """Count an error response in `request_errors_total` by its status, then return it."""
    metrics: Metrics = app.state.metrics
    metrics.record_http_error(response.status_code)
    return response


def validation_error(exc: RequestValidationError) -> errors.InvalidRequestError:
    """Turn FastAPI's validation report into one 400 naming the first offending field.

    Every malformed request is a 400, a value of the wrong JSON type (`"stream": "yes"`) included: OpenAI and vLLM
    answer so, and the `openai` SDK raises its BadRequestError for it. 422 is kept for well-formed content the
    server cannot use (an adapter that does not fit the model, an invalid key file).
    """
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return errors.InvalidRequestError(f"request body is not valid JSON: {first['ctx']['error']}")
    loc, message = tuple(first["loc"]), str(first["msg"]).removeprefix("Value error, ")
    if loc[-1:] == ("[key]",):  # a bad key of an object (`metadata`): the object is the field, the key is named
        loc, message = loc[:-2], f"key {str(loc[-2])[:64]!r}: {message}"
    param = _param_path(loc)
    if param is None and isinstance(first.get("input"), bytes):
        return errors.InvalidRequestError("request body must be JSON, sent with Content-Type: application/json")
    if param is None and _is_type_error(first["type"]):
        return errors.InvalidRequestError(f"request body must be a JSON object: {message}")
    if param is None:
        return errors.InvalidRequestError(f"request body: {message}")
    if first["type"] == "extra_forbidden":
        return errors.InvalidRequestError(f"{param}: unknown field, not implemented by this server", param=param)
    return errors.InvalidRequestError(f"{param}: {message}", param=param)


def _is_type_error(kind: str) -> bool:
    # pydantic names its type checks "<type>_type": bool_type, int_type, list_type, model_type, ...
    return kind.endswith("_type")


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


async def _loraplex_error(request: Request, exc: errors.LoraplexError) -> Response:
    if status_of(type(exc)) == 500:
        logger.error("%s %s failed: %s", request.method, request.url.path, exc.message)
    return _counted(request.app, error_response(exc))


async def _request_validation_error(request: Request, exc: RequestValidationError) -> Response:
    return _counted(request.app, error_response(validation_error(exc)))


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        not_found = errors.NotFoundError(f"no route for {request.method} {request.url.path}")
        return _counted(request.app, error_response(not_found))
    body = error_body(errors.InvalidRequestError(str(exc.detail)))
    headers = exc.headers
    allowed = _documented_methods(request) if exc.status_code == 405 else []
    if allowed:  # Starlette names only the methods of the first route of the path, not of all of them
        headers = {**(headers or {}), "Allow": ", ".join(allowed)}
    return _counted(request.app, JSONResponse(body, status_code=exc.status_code, headers=headers))


def _documented_methods(request: Request) -> list[str]:
    """Every method /openapi.json lists for the request's path."""
    methods: set[str] = set()
    for path, operations in request.app.openapi()["paths"].items():
        if compile_path(path)[0].match(request.scope["path"]):
            methods |= {method.upper() for method in operations}
    return sorted(methods)


async def _client_disconnect(request: Request, exc: ClientDisconnect) -> Response:
    logger.info("client disconnected from %s %s", request.method, request.url.path)
    return _counted(request.app, Response(status_code=CLIENT_CLOSED_REQUEST))


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    # Starlette re-raises after this handler, so the server logs the traceback; the client learns nothing internal.
    return _counted(request.app, error_response(errors.LoraplexError("internal server error")))


def install_error_handlers(app: FastAPI) -> None:
    """Register every exception handler of the API on `app`."""
    app.add_exception_handler(errors.LoraplexError, _loraplex_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    app.add_exception_handler(Exception, _unexpected_error)
