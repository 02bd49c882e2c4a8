"""Guard against adapter configs whose regular expressions would hang the server.

`target_modules`, `exclude_modules`, `layers_pattern` and the keys of `rank_pattern`/`alpha_pattern` are regexes
the config's author wrote, and a pattern like `(.*.*)*z` backtracks for hours on a 30-character module name. Python's
`re` holds the GIL while it matches, so a thread with a timeout cannot contain it: every pattern is first run, the
way `server.adapters.config` runs it, against every module name it will meet, in a throwaway subprocess with a
deadline. Only configs that pass are parsed in-process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from server.adapters.config import MAX_PATTERNS
from server.adapters.config import MAX_TEXT_CHARS as MAX_PATTERN_CHARS
from server.errors import AdapterError
from server.model import module_names
from server.model.module_names import ModuleNames

MATCH_BUDGET_S = 0.5  # all matches of one config, timed inside the subprocess
DEADLINE_S = 3.0  # the subprocess as a whole, start-up included

# Reads [[kind, regex], ...] and subjects; prints the index of each probe before running it, then the time taken.
PROBE = """
import json, re, sys, time
job = json.load(sys.stdin)
start = time.perf_counter()
for i, (kind, regex) in enumerate(job["probes"]):
    print(i, flush=True)
    try:
        pattern = re.compile(regex)
    except re.error:
        continue
    match = pattern.fullmatch if kind == "fullmatch" else pattern.match
    for subject in job["subjects"]:
        match(subject)
print("done", time.perf_counter() - start, flush=True)
"""


def check_config_patterns(raw: Mapping[str, Any], num_layers: int, modules: ModuleNames = module_names.LLAMA) -> None:
    """Refuse a config whose regexes are too long, too many or too slow on this model's module names."""
    probes = _probes(raw)
    if not probes:
        return
    if len(probes) > MAX_PATTERNS:
        raise AdapterError(f"{probes[0][0]}: more than {MAX_PATTERNS} patterns", param=probes[0][0])
    subjects = modules.all_projections(num_layers) + modules.others(num_layers)
    job = json.dumps({"probes": [[kind, regex] for _, kind, regex in probes], "subjects": subjects})
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-c", PROBE], input=job, capture_output=True, text=True, timeout=DEADLINE_S
        )
        lines, elapsed = done.stdout.split(), _elapsed(done.stdout)
    except subprocess.TimeoutExpired as exc:
        lines, elapsed = _text(exc.stdout).split(), None
    if elapsed is None or elapsed > MATCH_BUDGET_S:
        started = [int(token) for token in lines if token.isdigit()]
        field = probes[started[-1]][0] if started else probes[0][0]
        raise AdapterError(
            f"{field}: a regular expression takes too long to match module names (catastrophic backtracking); "
            "simplify it or list the module names",
            param=field,
        )


def _probes(raw: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(field, "fullmatch" | "match", regex) for every user regex, wrapped exactly as config.py wraps it."""
    probes = []
    for field in ("target_modules", "exclude_modules"):
        if isinstance(raw.get(field), str):
            probes.append((field, "fullmatch", _checked(field, raw[field])))
    layers_pattern = raw.get("layers_pattern")
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern or []:
        if isinstance(pattern, str):
            regex = rf"(?:^|.*?\.){_checked('layers_pattern', pattern)}\.(?P<idx>\d+)\."
            probes.append(("layers_pattern", "match", regex))
    for field in ("rank_pattern", "alpha_pattern"):
        keys = raw.get(field)
        if isinstance(keys, dict):
            probes += [(field, "match", rf"(.*\.)?({_checked(field, key)})$") for key in keys if isinstance(key, str)]
    return probes


def _checked(field: str, pattern: str) -> str:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise AdapterError(f"{field}: a pattern is longer than {MAX_PATTERN_CHARS} characters", param=field)
    return pattern


def _elapsed(stdout: str) -> float | None:
    last = stdout.strip().rsplit("\n", 1)[-1].split()
    return float(last[1]) if len(last) == 2 and last[0] == "done" else None


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""
