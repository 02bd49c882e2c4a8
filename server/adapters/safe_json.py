"""Parse JSON an uploader wrote (adapter_config.json, a safetensors header, loraplex.json) into plain, bounded values.

Python's `json` accepts what later breaks a response or the server: `NaN` and `Infinity`, numbers that overflow to
infinity or take quadratic time to convert (`1` followed by 5,000 digits), strings holding lone UTF-16 surrogates
(which cannot be encoded as UTF-8, so a response that echoes one fails), nesting deep enough to exhaust the
interpreter's stack, and encodings other than UTF-8. `parse_json_object` refuses each of them with a `ValueError`
that says what is wrong; callers turn it into the error of their file.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 32  # configs nest 2-3 levels; a safetensors header 3
MAX_INT_DIGITS = 19  # int64, the range every JSON client reads exactly
INT64 = 2**63


def parse_json_object(data: bytes, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """The JSON object in `data` (UTF-8), with every number finite and in int64 and every string encodable.

    Raises `ValueError` naming the problem; work and memory are linear in `len(data)`.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_int=_bounded_int, parse_float=_finite_float)
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    _check_tree(value, max_depth)
    return value


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS or not -INT64 <= (value := int(digits)) < INT64:
        raise ValueError(f"the integer {digits[:24]}... is outside the 64-bit range")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:24]} overflows to infinity")
    return value


def _check_tree(root: dict[str, Any], max_depth: int) -> None:
    """Depth and strings of every value, iteratively (the tree may be as deep as the parser allowed)."""
    pending: list[tuple[Any, int]] = [(root, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, str):
            _check_text(value)
        elif isinstance(value, dict | list):
            if depth > max_depth:
                raise ValueError(f"nested deeper than {max_depth} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key)
                pending.append((item, depth + 1))


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"the string {text[:40]!r} holds a lone UTF-16 surrogate") from None
