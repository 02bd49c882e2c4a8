"""Objects that do not say `additionalProperties` are closed, wherever they sit in a schema; what a schema says is
kept, and `allOf` members (which describe one object together) stay open."""

from __future__ import annotations

import copy

import pytest

from server.engine.closed_objects import close_objects

POINT = {"type": "object", "properties": {"x": {"type": "number"}}}
CLOSED_POINT = {**POINT, "additionalProperties": False}


def point() -> dict:
    return copy.deepcopy(POINT)


@pytest.mark.parametrize(
    ("schema", "closed"),
    [
        (point(), CLOSED_POINT),
        ({"type": "object", "patternProperties": {"^x": {}}}, {"type": "object", "patternProperties": {"^x": {}},
                                                              "additionalProperties": False}),
        ({"type": "array", "items": point()}, {"type": "array", "items": CLOSED_POINT}),
        ({"type": "array", "prefixItems": [point()]}, {"type": "array", "prefixItems": [CLOSED_POINT]}),
        ({"anyOf": [point(), {"type": "null"}]}, {"anyOf": [CLOSED_POINT, {"type": "null"}]}),
        ({"oneOf": [point()]}, {"oneOf": [CLOSED_POINT]}),
        ({"$defs": {"p": point()}, "$ref": "#/$defs/p"}, {"$defs": {"p": CLOSED_POINT}, "$ref": "#/$defs/p"}),
        ({"definitions": {"p": point()}}, {"definitions": {"p": CLOSED_POINT}}),
        ({"type": "object", "additionalProperties": point()}, {"type": "object", "additionalProperties": CLOSED_POINT}),
        # A property named like a keyword is a property, not a keyword.
        ({"type": "object", "properties": {"properties": point(), "items": {"type": "string"}}},
         {"type": "object", "properties": {"properties": CLOSED_POINT, "items": {"type": "string"}},
          "additionalProperties": False}),
    ],
)  # fmt: skip
def test_objects_that_declare_properties_are_closed_wherever_they_are(schema: dict, closed: dict) -> None:
    given = copy.deepcopy(schema)
    assert close_objects(schema) == closed
    assert schema == given  # the request's own schema is left as it came


def test_nested_objects_are_closed_at_every_level() -> None:
    schema = {"type": "object", "properties": {"p": {"type": "object", "properties": {"q": point()}}}}
    closed = close_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["p"]["additionalProperties"] is False
    assert closed["properties"]["p"]["properties"]["q"] == CLOSED_POINT


@pytest.mark.parametrize(
    "schema",
    [
        {**POINT, "additionalProperties": True},
        {**POINT, "additionalProperties": {"type": "integer"}},
        {**POINT, "unevaluatedProperties": False},
        {"type": "object"},  # no declared properties: any object, as json_object asks
        {"type": "string", "const": {"properties": {}}},  # values are not schemas
        {"enum": [{"properties": {"a": 1}}]},
    ],
)
def test_what_a_schema_says_is_kept(schema: dict) -> None:
    assert close_objects(schema) == schema


def test_all_of_members_and_the_definitions_they_name_stay_open() -> None:
    schema = {
        "$defs": {"base": point(), "other": point()},
        "allOf": [{"$ref": "#/$defs/base"}, {"type": "object", "properties": {"y": {"properties": {}}}}],
        "properties": {"z": {"$ref": "#/$defs/other"}},
    }
    closed = close_objects(schema)
    assert "additionalProperties" not in closed  # it holds the allOf
    assert closed["$defs"]["base"] == POINT
    assert "additionalProperties" not in closed["allOf"][1]
    assert closed["allOf"][1]["properties"]["y"]["additionalProperties"] is False  # inside a member: its own object
    assert closed["$defs"]["other"] == CLOSED_POINT
