"""Hypothesis strategies for request bodies: drawn from the app's own JSON schemas, then pushed beyond them."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

Schema = dict[str, Any]

# Text a tokenizer may choke on: lone surrogates, NUL, control and combining characters, right-to-left marks.
HOSTILE_CHARS = st.one_of(
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    st.sampled_from(["\x00", "\x1b", "\u202e", "\u0301", "\ufffd", "\U0010ffff", "\\", '"']),
    st.characters(),
)
hostile_text = st.one_of(st.text(HOSTILE_CHARS, max_size=40), st.sampled_from(["<|im_end|>", "<|im_start|>user"]))
lone_surrogate_text = st.tuples(
    st.text(max_size=5), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), st.text(max_size=5)
).map("".join)
huge_ints = st.sampled_from([2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**30, -1, 0])
hostile_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    huge_ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e-300, 5e-324, 1e-6, -0.0, 1e308]),
    hostile_text,
    st.sampled_from(["yes", "true", "1", "", "null"]),
)
hostile_json = st.recursive(
    hostile_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(hostile_text, inner, max_size=4)),
    max_leaves=12,
)


class SchemaStrategies:
    """Strategies for the values an OpenAPI document's JSON schemas describe (the subset FastAPI emits)."""

    def __init__(self, document: Schema) -> None:
        self.components = document["components"]["schemas"]

    def values(self, schema: Schema) -> st.SearchStrategy[Any]:
        if "$ref" in schema:
            return st.deferred(lambda: self.values(self.components[schema["$ref"].rsplit("/", 1)[-1]]))
        if "anyOf" in schema:
            return st.one_of([self.values(option) for option in schema["anyOf"]])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        if "const" in schema:
            return st.just(schema["const"])
        kind = schema.get("type")
        if kind == "object":
            return self._object(schema)
        if kind == "array":
            items = self.values(schema.get("items", {}))
            return st.lists(items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 3), 3))
        if kind == "string":
            size = min(schema.get("maxLength", 24), 24)
            alphabet = st.one_of(st.characters(codec="utf-8"), HOSTILE_CHARS)  # JSON strings may escape surrogates
            return st.text(alphabet, min_size=schema.get("minLength", 0), max_size=size)
        if kind == "integer":
            return st.integers(schema.get("minimum"), schema.get("maximum"))
        if kind == "number":
            low, high = schema.get("minimum", schema.get("exclusiveMinimum")), schema.get("maximum")
            numbers = st.floats(low, high, allow_nan=False, allow_infinity=False)
            return numbers.filter(lambda x: x != schema.get("exclusiveMinimum"))
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        return hostile_json

    def _object(self, schema: Schema) -> st.SearchStrategy[dict[str, Any]]:
        properties = schema.get("properties", {})
        required = set(schema.get("required", []))
        if not properties:
            return st.dictionaries(st.text(max_size=8), hostile_scalars, max_size=3)
        return st.fixed_dictionaries(
            {name: self.values(properties[name]) for name in required},
            optional={name: self.values(sub) for name, sub in properties.items() if name not in required},
        )

    def bodies(self, name: str) -> st.SearchStrategy[dict[str, Any]]:
        """Valid-looking bodies of the component `name`, and the same with fields broken or added."""
        valid = self.values({"$ref": f"#/components/schemas/{name}"})
        properties = list(self.components[name]["properties"])
        return st.one_of(
            valid,
            st.tuples(valid, st.sampled_from(properties), hostile_json).map(lambda t: {**t[0], t[1]: t[2]}),
            st.tuples(valid, hostile_text, hostile_json).map(lambda t: {**t[0], t[1]: t[2]}),
            st.tuples(valid, st.sampled_from(properties)).map(lambda t: {k: v for k, v in t[0].items() if k != t[1]}),
            st.tuples(valid, st.integers(0, 99), st.one_of(lone_surrogate_text, hostile_text)).map(
                lambda t: replace_string(t[0], t[1], t[2])
            ),
        )


def replace_string(document: Any, index: int, text: str) -> Any:
    """`document` with its `index`-th string value (modulo their number, depth first) replaced by `text`."""
    slots: list[tuple[Any, Any]] = []  # (container, key) of every string value

    def collect(node: Any) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            if isinstance(value, str):
                slots.append((node, key))
            collect(value)

    document = json.loads(json.dumps(document))  # a private copy
    collect(document)
    if slots:
        container, key = slots[index % len(slots)]
        container[key] = text
    return document


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


raw_bodies = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"", b"{", b"null", b"[]", b'"text"', b"\xff\xfe", b'{"model": "\xc3\x28"}']),
    st.integers(1, 3000).map(lambda d: ('{"model": "tiny", "prompt": "a", "user": ' + deep(d) + "}").encode()),
    hostile_json.map(lambda value: json.dumps(value).encode()),
)
