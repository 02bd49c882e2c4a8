"""User regexes in adapter configs: catastrophic ones are refused by a subprocess with a deadline, the rest pass."""

from __future__ import annotations

import time

import pytest

from server.adapters import patterns
from server.adapters.patterns import MAX_PATTERN_CHARS, check_config_patterns
from server.errors import AdapterError

NUM_LAYERS = 30


@pytest.fixture(autouse=True)
def _short_deadline(monkeypatch):
    monkeypatch.setattr(patterns, "DEADLINE_S", 1.5)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"target_modules": "(.*.*)*z"}, "target_modules"),
        ({"target_modules": ["q_proj"], "rank_pattern": {"q_proj": 4, "(.*.*)*z": 8}}, "rank_pattern"),
    ],
)
def test_catastrophic_patterns_are_refused_in_time(raw, field):
    start = time.monotonic()
    with pytest.raises(AdapterError, match="catastrophic backtracking") as info:
        check_config_patterns(raw, NUM_LAYERS)
    assert info.value.param == field
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    "raw",
    [
        {"target_modules": r".*\.(q_proj|v_proj)"},
        {"target_modules": ["q_proj"], "exclude_modules": r".*layers\.1\..*", "layers_pattern": "layers"},
        {"target_modules": ["q_proj"], "rank_pattern": {"q_proj": 4}, "alpha_pattern": {r"layers\.[0-3]\..*": 2}},
        {"target_modules": "(unclosed"},  # left for the config parser to report
    ],
)
def test_ordinary_patterns_pass(raw):
    check_config_patterns(raw, NUM_LAYERS)


def test_long_patterns_are_refused():
    with pytest.raises(AdapterError, match="longer than") as info:
        check_config_patterns({"exclude_modules": "a" * (MAX_PATTERN_CHARS + 1)}, NUM_LAYERS)
    assert info.value.param == "exclude_modules"


def test_configs_without_regexes_start_no_subprocess(monkeypatch):
    monkeypatch.setattr(patterns.subprocess, "run", lambda *a, **k: pytest.fail("no subprocess expected"))
    check_config_patterns({"target_modules": ["q_proj", "v_proj"], "rank_pattern": {}}, NUM_LAYERS)
