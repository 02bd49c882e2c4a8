"""The route class of every JSON route: the app's bounds apply while the body validates, after a raw check.

Before FastAPI validates a JSON body, its nesting depth and its strings are checked, so that the parser's
recursion limit, and strings no tokenizer or file name can take (lone UTF-16 surrogates, which JSON's `\\ud800`
escapes can carry), end in a 400 that names the field instead of deep inside the server.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from server.api.limits import active_settings, flag
from server.errors import InvalidRequestError
from server.settings import Settings

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class BoundedRoute(APIRoute):
    """An APIRoute that checks the raw JSON body, then validates it under the app's bounds (`server.api.limits`)."""

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()

        async def bounded_handler(request: Request) -> Response:
            settings: Settings = request.app.state.settings
            if request.headers.get("content-type", "").startswith("application/json"):
                check_json_body(await request.body(), settings.max_json_depth)
            with active_settings(settings):
                return await handler(request)

        return bounded_handler


def check_json_body(body: bytes, max_depth: int) -> None:
    """Refuse a JSON body nested deeper than `max_depth` or holding a string that is not valid Unicode text.

    A body that is not JSON at all passes: FastAPI reports it with the parser's own message.
    """
    try:
        document = json.loads(body)
    except RecursionError:
        raise InvalidRequestError(
            f"request body is nested deeper than {max_depth} levels ({flag('max_json_depth')})"
        ) from None
    except ValueError:
        return
    stack: list[tuple[Any, str, int]] = [(document, "", 1)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, (dict, list)) and depth > max_depth:
            raise InvalidRequestError(
                f"{path or 'request body'}: nested deeper than {max_depth} levels ({flag('max_json_depth')})",
                param=path or None,
            )
        if isinstance(node, dict):
            for key, value in node.items():
                # A key with a surrogate is named with it escaped, so that the error itself can be sent.
                name = key.encode("utf-8", "backslashreplace").decode()
                child = f"{path}.{name}" if path else name
                _check_text(key, child)
                stack.append((value, child, depth + 1))
        elif isinstance(node, list):
            stack.extend((value, f"{path}[{i}]", depth + 1) for i, value in enumerate(node))
        elif isinstance(node, str):
            _check_text(node, path)


def _check_text(text: str, path: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{path or 'request body'}: holds a lone UTF-16 surrogate ({exc.object[exc.start]!a}) at character "
            f"{exc.start}, which is not valid Unicode text",
            param=path or None,
        ) from None
