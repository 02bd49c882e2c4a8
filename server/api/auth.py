"""Bearer-token authentication of the admin API; the generation routes take none."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from server.errors import AuthenticationError, PermissionDeniedError

bearer = HTTPBearer(auto_error=False, description="The admin token the server was started with")


def require_admin(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """Pass requests that carry the admin token; 403 while no token is configured, 401 for a missing or wrong one."""
    token: SecretStr | None = request.app.state.settings.admin_token
    if token is None or not token.get_secret_value():
        raise PermissionDeniedError(
            "the admin API is disabled; start the server with LORAPLEX_ADMIN_TOKEN set (or --admin-token) to enable it"
        )
    given = "" if credentials is None else credentials.credentials
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise AuthenticationError("missing or wrong admin token; send the header 'Authorization: Bearer <token>'")
