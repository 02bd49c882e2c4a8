"""One error hierarchy for everything a user can cause; the API maps it to HTTP in one place."""

from __future__ import annotations


class LoraplexError(Exception):
    """Base of every user-facing error: carries the HTTP status and the OpenAI error fields."""

    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class InvalidRequestError(LoraplexError):
    """The request is well-formed JSON but asks for something impossible (400)."""

    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(LoraplexError):
    """Missing or wrong credentials (401)."""

    status_code = 401
    error_type = "authentication_error"


class PermissionDeniedError(LoraplexError):
    """The route exists but is switched off in this configuration (403)."""

    status_code = 403
    error_type = "permission_error"


class NotFoundError(LoraplexError):
    """Unknown model, adapter or route (404)."""

    status_code = 404
    error_type = "not_found_error"


class ConflictError(LoraplexError):
    """The target already exists or is in a state that forbids the change (409)."""

    status_code = 409
    error_type = "conflict_error"


class PayloadTooLargeError(LoraplexError):
    """The request body or an uploaded file is over its size limit (413)."""

    status_code = 413
    error_type = "invalid_request_error"


class UnsupportedMediaError(LoraplexError):
    """An uploaded file is not in an accepted format (415)."""

    status_code = 415
    error_type = "invalid_request_error"


class ValidationError(LoraplexError):
    """The content is syntactically valid but semantically wrong, e.g. a bad adapter (422)."""

    status_code = 422
    error_type = "invalid_request_error"


class QueueFullError(LoraplexError):
    """Too many waiting requests; retry later (429)."""

    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: int = 1, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.retry_after_s = retry_after_s


class ServiceUnavailableError(LoraplexError):
    """The engine is not ready or has stopped (503)."""

    status_code = 503
    error_type = "service_unavailable_error"


class AdapterError(ValidationError):
    """An adapter's config or tensors cannot be served on this base model (422)."""


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
