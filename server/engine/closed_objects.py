"""JSON schemas made closed by default: an object that declares its properties generates only those.

JSON Schema lets an object hold any other key unless `additionalProperties` says otherwise, and a grammar that
follows the letter of it lets a small model wander into keys nobody asked for (and loop there). vLLM's default
grammar backend, xgrammar, generates only the declared properties; so does this server. An explicit
`additionalProperties` (true, false or a schema) is kept.

`allOf` is the exception: its members describe one object together, so closing a member (or the object holding
the `allOf`) would forbid the other members' keys. Those objects, and the definitions they reference, stay as
written.
"""

from __future__ import annotations

import copy
from typing import Any

# Keywords whose value is a schema, a list of schemas, or a map from names to schemas.
_SCHEMA = ("additionalProperties", "items", "additionalItems", "contains", "propertyNames", "not", "if", "then",
           "else", "unevaluatedItems", "unevaluatedProperties")  # fmt: skip
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems", "items")
_SCHEMA_MAPS = ("properties", "patternProperties", "dependentSchemas")
_DEFINITIONS = ("$defs", "definitions")


def close_objects(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of `schema` in which every object schema that declares `properties` or `patternProperties` and does
    not say `additionalProperties` (nor `unevaluatedProperties`) has `additionalProperties: false`."""
    closed = copy.deepcopy(schema)
    _close(closed, _kept_open_refs(closed), keep_open=False)
    return closed


def _close(schema: Any, open_refs: set[str], keep_open: bool) -> None:
    if not isinstance(schema, dict):
        return
    declares = "properties" in schema or "patternProperties" in schema
    says = "additionalProperties" in schema or "unevaluatedProperties" in schema
    if declares and not says and not keep_open and "allOf" not in schema:
        schema["additionalProperties"] = False
    for member in _list(schema.get("allOf")):
        _close(member, open_refs, keep_open=True)
    for key in _SCHEMA:
        _close(schema.get(key), open_refs, keep_open=False)
    for key in _SCHEMA_LISTS:
        for member in _list(schema.get(key)):
            _close(member, open_refs, keep_open=False)
    for key in _SCHEMA_MAPS:
        for member in _map(schema.get(key)).values():
            _close(member, open_refs, keep_open=False)
    for key in _DEFINITIONS:
        for name, member in _map(schema.get(key)).items():
            _close(member, open_refs, keep_open=f"#/{key}/{name}" in open_refs)


def _kept_open_refs(schema: Any) -> set[str]:
    """The `$ref`s that `allOf` members name anywhere in `schema`: their definitions stay open."""
    refs: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            refs.update(m["$ref"] for m in _list(node.get("allOf")) if isinstance(m, dict) and "$ref" in m)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return refs


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _map(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
