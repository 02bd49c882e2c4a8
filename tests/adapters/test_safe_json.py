"""Uploaders' JSON: everything Python's parser accepts that would later break a response or the server is refused."""

from __future__ import annotations

import pytest

from server.adapters.safe_json import MAX_DEPTH, parse_json_object


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested deeper"),  # past the interpreter's stack
        (b'{"x": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}", "nested deeper"),  # within it, past the cap
        (b'{"x": 1' + b"0" * 5_000 + b"}", "64-bit"),
        (b'{"x": 9223372036854775808}', "64-bit"),
        (b'{"x": NaN}', "NaN"),
        (b'{"x": [Infinity]}', "Infinity"),
        (b'{"x": -1e400}', "infinity"),
        (b'{"\\udc00": 1}', "surrogate"),
        (b'{"x": ["\\ud800"]}', "surrogate"),
        (b'{"x": "\xc3"}', "UTF-8"),
        ('{"x": 1}'.encode("utf-16"), "UTF-8"),
        (b"[1]", "not a JSON object"),
        (b'{"x": ', "not valid JSON"),
    ],
)
def test_hostile_json_is_refused_with_its_reason(data, reason):
    with pytest.raises(ValueError, match=reason):
        parse_json_object(data)


def test_plain_json_parses_as_json_does():
    data = b'{"a": [1, -9223372036854775808, 2.5e3, "\\ud83d\\ude00", null, true], "b": {"c": "\xc3\xa9"}}'
    assert parse_json_object(data) == {"a": [1, -(2**63), 2500.0, "\U0001f600", None, True], "b": {"c": "é"}}
