"""`--speculative-config`: vLLM's JSON spelling of the speculation method and its sizes, checked once at start.

Three methods: `ngram` (prompt lookup in the row itself), `suffix` (prompt lookup plus the outputs this adapter
gave before, vLLM's suffix decoding keys) and `draft_model` (a smaller model of the same tokenizer proposes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from server.errors import ConfigurationError

MAX_SPECULATIVE_TOKENS = 32  # a verification chunk longer than this costs more than a decode step saves
_PARAM = "speculative_config"
_KEYS = {
    "ngram": {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"},
    "suffix": {
        "method",
        "num_speculative_tokens",
        "suffix_decoding_max_tree_depth",
        "suffix_decoding_max_cached_requests",
        "suffix_decoding_max_spec_factor",
        "suffix_decoding_min_token_prob",
    },
    "draft_model": {"method", "num_speculative_tokens", "model"},
}


@dataclass(frozen=True)
class SpeculativeConfig:
    """Up to `num_speculative_tokens` proposed tokens per row and step, by `method`.

    ngram: the tokens after the latest earlier match of the row's last n tokens (n from `prompt_lookup_max` down to
    `prompt_lookup_min`). suffix: the better of that (matches up to `max_tree_depth` tokens) and the continuation
    most of the adapter's `max_cached_requests` latest outputs agree on, stopping where the agreement falls under
    `min_token_prob` or the proposal grows past `max_spec_factor` times the matched length. draft_model: what the
    model in folder `model` decodes greedily.
    """

    num_speculative_tokens: int
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 1
    method: str = "ngram"
    max_tree_depth: int = 24
    max_cached_requests: int = 10_000
    max_spec_factor: float = 1.0
    min_token_prob: float = 0.1
    model: str | None = None


def parse_speculative_config(text: str) -> SpeculativeConfig:
    """The config a JSON object describes; a ConfigurationError naming what is wrong otherwise."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ConfigurationError(f"--speculative-config is not JSON: {exc}", param=_PARAM) from exc
    if not isinstance(raw, dict):
        raise ConfigurationError("--speculative-config must be a JSON object", param=_PARAM)
    method = raw.get("method", "ngram")
    if method not in _KEYS:
        raise ConfigurationError(
            f"--speculative-config method {method!r} is not supported; use one of {sorted(_KEYS)}", param=_PARAM
        )
    unknown = sorted(set(raw) - _KEYS[method])
    if unknown:
        raise ConfigurationError(
            f"--speculative-config has unknown keys {unknown} for method {method!r}; known: {sorted(_KEYS[method])}",
            param=_PARAM,
        )
    if method == "suffix":
        return _suffix(raw)
    k = _tokens(raw, None)
    if method == "draft_model":
        model = raw.get("model")
        if not isinstance(model, str) or not model:
            raise ConfigurationError("method 'draft_model' needs model, the draft model's folder", param=_PARAM)
        return SpeculativeConfig(k, method=method, model=model)
    # vLLM takes one bound for both when only one is given.
    low = _positive(raw, "prompt_lookup_min", raw.get("prompt_lookup_max"))
    high = _positive(raw, "prompt_lookup_max", low)
    if low > high:
        raise ConfigurationError(f"prompt_lookup_min {low} is above prompt_lookup_max {high}", param=_PARAM)
    return SpeculativeConfig(k, low, high)


def _suffix(raw: dict) -> SpeculativeConfig:
    depth = _positive(raw, "suffix_decoding_max_tree_depth", 24)
    factor = _fraction(raw, "suffix_decoding_max_spec_factor", 1.0, upper=None)
    return SpeculativeConfig(
        _tokens(raw, min(depth, MAX_SPECULATIVE_TOKENS)),  # vLLM's default: as deep as the tree
        prompt_lookup_min=1,
        prompt_lookup_max=depth,
        method="suffix",
        max_tree_depth=depth,
        max_cached_requests=_positive(raw, "suffix_decoding_max_cached_requests", 10_000, zero=True),
        max_spec_factor=factor,
        min_token_prob=_fraction(raw, "suffix_decoding_min_token_prob", 0.1, upper=1.0),
    )


def _tokens(raw: dict, default: int | None) -> int:
    k = _positive(raw, "num_speculative_tokens", default)
    if k > MAX_SPECULATIVE_TOKENS:
        raise ConfigurationError(
            f"num_speculative_tokens must be at most {MAX_SPECULATIVE_TOKENS}, got {k}", param=_PARAM
        )
    return k


def _positive(raw: dict, key: str, default: object, zero: bool = False) -> int:
    value = raw.get(key, default)
    if value is None:
        raise ConfigurationError(f"--speculative-config needs {key}", param=_PARAM)
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if zero else 1):
        kind = "a non-negative" if zero else "a positive"
        raise ConfigurationError(f"{key} must be {kind} integer, got {value!r}", param=_PARAM)
    return value


def _fraction(raw: dict, key: str, default: float, upper: float | None) -> float:
    value = raw.get(key, default)
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not value >= 0
        or (upper is not None and value > upper)
        or value == float("inf")
    ):
        bound = f"between 0 and {upper}" if upper is not None else "a finite number at least 0"
        raise ConfigurationError(f"{key} must be {bound}, got {value!r}", param=_PARAM)
    return float(value)
