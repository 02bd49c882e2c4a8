"""One error hierarchy for everything a user or an operator can cause, named for what went wrong.

These are domain errors: they know nothing of HTTP. The API layer maps each class to its status code and
OpenAI error type in one table (`server/api/errors.py`); the CLI prints the message.
"""

from __future__ import annotations


class LoraplexError(Exception):
    """Base of every error the server reports to whoever caused it: a message that says what to fix."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param  # the request field (or setting) at fault, when there is one
        self.code = code


class ConfigurationError(LoraplexError):
    """The server's own configuration (flags, model directory, device) cannot work; raised at startup."""


class InvalidRequestError(LoraplexError):
    """The request is malformed (a missing field, a value of the wrong type) or asks for something impossible."""


class AuthenticationError(LoraplexError):
    """Missing or wrong credentials."""


class PermissionDeniedError(LoraplexError):
    """The route exists but is switched off in this configuration."""


class NotFoundError(LoraplexError):
    """Unknown model, adapter or route."""


class ConflictError(LoraplexError):
    """The target already exists or is in a state that forbids the change."""


class PayloadTooLargeError(LoraplexError):
    """The request body or an uploaded file is over its size limit."""


class UnsupportedMediaError(LoraplexError):
    """An uploaded file is not in an accepted format."""


class ValidationError(LoraplexError):
    """The content is syntactically valid but semantically wrong, e.g. a bad adapter."""


class QueueFullError(LoraplexError):
    """Too many waiting requests; retry later."""

    def __init__(self, message: str, *, retry_after_s: int = 1, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.retry_after_s = retry_after_s


class ServiceUnavailableError(LoraplexError):
    """The engine is not ready or has stopped."""


class AdapterError(ValidationError):
    """An adapter's config or tensors cannot be served on this base model."""


class QuotaExceededError(QueueFullError):
    """A tenant is over one of its limits (requests or tokens per minute, concurrent requests); answered as a full
    queue is (429 with Retry-After)."""


class KeyFileError(ValidationError):
    """The API keys file cannot be read or does not describe valid tenants (422 when a reload finds it)."""


def model_not_found(model: str) -> NotFoundError:
    """The one answer for a model that is not served, or not served to this client: nothing tells the two apart."""
    return NotFoundError(
        f"the model {model!r} does not exist; GET /v1/models lists what is served",
        param="model",
        code="model_not_found",
    )
