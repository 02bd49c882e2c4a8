"""What /openapi.json says about each route's answers: its error statuses declared once, its bounds filled in."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from server import errors
from server.api.errors import status_of
from server.api.limits import publish_limits
from server.api.responses import ErrorResponse
from server.settings import Settings

_HEADERS = {
    429: {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}},
    401: {"WWW-Authenticate": {"description": "the scheme to authenticate with: Bearer", "schema": {"type": "string"}}},
}

# Errors every JSON route can answer: a bad or oversized body (every malformed field is a 400, as OpenAI answers),
# an engine that is not ready, and a bug.
JSON_BODY_ERRORS = (errors.InvalidRequestError, errors.PayloadTooLargeError)
ENGINE_ERRORS = (errors.ServiceUnavailableError,)
# A generation can also name an adapter whose stored files turn out unservable when it is loaded (422).
GENERATION_ERRORS = (
    *JSON_BODY_ERRORS,
    *ENGINE_ERRORS,
    errors.NotFoundError,
    errors.QueueFullError,
    errors.AdapterError,
)

EVENT_STREAM = {
    200: {
        "description": "the whole response as JSON, or with `stream: true` server-sent events ending in `data: [DONE]`",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


def error_responses(*raised: type[errors.LoraplexError]) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that raises these errors: each status once, in the OpenAI error shape.

    Every route can also answer 500 (a bug). A status's description lists the errors that give it.
    """
    statuses: dict[int, list[str]] = {}
    for error in (*raised, errors.LoraplexError):
        statuses.setdefault(status_of(error), []).append(_summary(error))
    return {
        status: {"model": ErrorResponse, "description": "; ".join(summaries), **_headers(status)}
        for status, summaries in sorted(statuses.items())
    }


def _summary(error: type[errors.LoraplexError]) -> str:
    return "a bug in the server" if error is errors.LoraplexError else (error.__doc__ or error.__name__).strip()


def _headers(status: int) -> dict[str, Any]:
    return {"headers": _HEADERS[status]} if status in _HEADERS else {}


def _drop_fastapi_validation_errors(document: dict[str, Any]) -> None:
    """Remove the 422 FastAPI declares for routes with parameters: its shape is not ours (see server.api.errors).

    A route that can answer 422 declares it with `error_responses`; the others (string path parameters only)
    cannot fail FastAPI's validation.
    """
    for operations in document["paths"].values():
        for operation in operations.values():
            declared = operation["responses"].get("422", {})
            if "HTTPValidationError" in str(declared):
                del operation["responses"]["422"]
    for name in ("HTTPValidationError", "ValidationError"):
        document.get("components", {}).get("schemas", {}).pop(name, None)


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Serve an OpenAPI document whose bounds are this app's settings (see `server.api.limits`)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            publish_limits(document, settings)
            _drop_fastapi_validation_errors(document)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
