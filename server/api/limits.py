"""Request bounds an operator tunes: one marker both enforces a bound and publishes it in /openapi.json.

`Annotated[list[str], Bounded("max_stop_strings")]` refuses a list longer than the `max_stop_strings` setting of
the app serving the request (400 naming the field), and the app's OpenAPI document shows `maxItems` with that
value. Strings get `maxLength`, lists `maxItems`, objects `maxProperties`, integers `maximum`. A new field joins by
adding the marker to its annotation; the setting lives in `server/settings.py` with its flag.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from server.settings import Settings

LIMIT_KEY = "x-loraplex-limit"  # placeholder in the generated schema, replaced by the setting's value
# Exact integer bounds: FastAPI's OpenAPI models store `maximum` as a float, which rounds 2**63 - 1 up to 2**63.
EXACT_KEY = "x-loraplex-exact"
_KEYWORDS = {"string": "maxLength", "array": "maxItems", "object": "maxProperties", "integer": "maximum"}
_UNITS = {str: "characters", list: "items", dict: "keys"}
_INTEGER_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")

_active: ContextVar[Settings | None] = ContextVar("loraplex_active_settings", default=None)


@contextmanager
def active_settings(settings: Settings) -> Iterator[None]:
    """Validate the request bodies of this context against `settings`' bounds."""
    token = _active.set(settings)
    try:
        yield
    finally:
        _active.reset(token)


def bound(setting: str) -> int:
    """The value of a bound setting in the current request's app, or its default outside a request."""
    settings = _active.get()
    if settings is None:
        return Settings.model_fields[setting].get_default(call_default_factory=True)
    return getattr(settings, setting)


def flag(setting: str) -> str:
    return "--" + setting.replace("_", "-")


@dataclass(frozen=True)
class Bounded:
    """Annotation marker: the value's size (length, item count, or the integer itself) is at most a setting."""

    setting: str

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema[LIMIT_KEY] = self.setting
        return json_schema

    def _check(self, value: Any) -> Any:
        limit = bound(self.setting)
        size = value if isinstance(value, int) else len(value)
        if size > limit:
            unit = next((name for kind, name in _UNITS.items() if isinstance(value, kind)), "")
            measured = f"{size} {unit}" if unit else str(size)
            raise PydanticCustomError(
                "over_limit",
                "{measured}, over the limit of {limit} (the server's {flag})",
                {"measured": measured, "limit": limit, "flag": flag(self.setting)},
            )
        return value


def exact(**bounds: int) -> dict[str, Any]:
    """`json_schema_extra` for integer bounds that must reach /openapi.json exactly, e.g. `exact(maximum=2**63 - 1)`."""
    return {EXACT_KEY: bounds}


def publish_limits(document: Any, settings: Settings) -> None:
    """Replace every placeholder in an OpenAPI document (in place) by the JSON-schema bound it stands for."""
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            node.update(node.pop(EXACT_KEY, {}))
            setting = node.pop(LIMIT_KEY, None)
            if setting is not None:  # a setting tightens the static bound (settings.py keeps it within)
                node[_KEYWORDS[node["type"]]] = getattr(settings, setting)
            if node.get("type") == "integer":  # 128.0 -> 128
                node.update({key: int(node[key]) for key in _INTEGER_BOUNDS if isinstance(node.get(key), float)})
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
