"""`--speculative-config`: vLLM's JSON spelling of the speculation method and its sizes, checked once at start."""

from __future__ import annotations

import json
from dataclasses import dataclass

from server.errors import ConfigurationError

MAX_SPECULATIVE_TOKENS = 32  # a verification chunk longer than this costs more than a decode step saves
_PARAM = "speculative_config"
_KEYS = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"}


@dataclass(frozen=True)
class SpeculativeConfig:
    """Prompt lookup (n-gram) speculation: up to `num_speculative_tokens` proposed tokens per row and step, found
    by matching the last n tokens (n from `prompt_lookup_max` down to `prompt_lookup_min`) earlier in the row."""

    num_speculative_tokens: int
    prompt_lookup_min: int
    prompt_lookup_max: int
    method: str = "ngram"


def parse_speculative_config(text: str) -> SpeculativeConfig:
    """The config a JSON object describes; a ConfigurationError naming what is wrong otherwise."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ConfigurationError(f"--speculative-config is not JSON: {exc}", param=_PARAM) from exc
    if not isinstance(raw, dict):
        raise ConfigurationError("--speculative-config must be a JSON object", param=_PARAM)
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigurationError(
            f"--speculative-config has unknown keys {unknown}; known: {sorted(_KEYS)}", param=_PARAM
        )
    method = raw.get("method", "ngram")
    if method != "ngram":
        raise ConfigurationError(
            f"--speculative-config method {method!r} is not supported; only 'ngram' (prompt lookup) is", param=_PARAM
        )
    k = _positive(raw, "num_speculative_tokens", None)
    if k > MAX_SPECULATIVE_TOKENS:
        raise ConfigurationError(
            f"num_speculative_tokens must be at most {MAX_SPECULATIVE_TOKENS}, got {k}", param=_PARAM
        )
    # vLLM takes one bound for both when only one is given.
    low = _positive(raw, "prompt_lookup_min", raw.get("prompt_lookup_max"))
    high = _positive(raw, "prompt_lookup_max", low)
    if low > high:
        raise ConfigurationError(f"prompt_lookup_min {low} is above prompt_lookup_max {high}", param=_PARAM)
    return SpeculativeConfig(k, low, high)


def _positive(raw: dict, key: str, default: object) -> int:
    value = raw.get(key, default)
    if value is None:
        raise ConfigurationError(f"--speculative-config needs {key}", param=_PARAM)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(f"{key} must be a positive integer, got {value!r}", param=_PARAM)
    return value
