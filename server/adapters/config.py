"""Parse a PEFT `adapter_config.json` and resolve, for one base model, the rank and scale of every targeted projection.

Matching follows PEFT 0.21 exactly (`peft.tuners.tuners_utils.check_target_module_exists` and
`peft.utils.other.get_pattern_key`), applied to the module names of the base model's Hugging Face class
(`model.layers.{i}.self_attn.q_proj`, ...; Phi-3's `qkv_proj`), which its family declares (`ModuleNames`).
Anything that would change what the adapter computes and that the server does not implement is refused with an
`AdapterError` naming the field.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from server.adapters.safe_json import parse_json_object
from server.adapters.store import CONFIG_FILE
from server.errors import AdapterError
from server.model import module_names
from server.model.module_names import ModuleNames

MAX_CONFIG_BYTES = 1 << 20
# Caps that keep checking a config linear in its size: list entries, pattern entries, characters of one name or regex.
MAX_LIST_ITEMS = 1024
MAX_PATTERNS = 256
MAX_TEXT_CHARS = 512
LIST_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")

# Fields that only steer training or record provenance: any value serves the same way.
INERT_FIELDS = frozenset({
    "base_model_name_or_path", "revision", "task_type", "inference_mode", "auto_mapping", "peft_version",
    "lora_dropout", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_core",
    "qalora_group_size", "ensure_weight_tying", "runtime_config",
})  # fmt: skip
HANDLED_FIELDS = frozenset({
    "peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "bias", "fan_in_fan_out",
    "modules_to_save", "init_lora_weights",
})  # fmt: skip
# These inits rewrite the base weights during training; the adapter is only valid on that modified base.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class TargetSpec:
    """Rank and scale (`alpha/r`, rsLoRA `alpha/sqrt(r)`) of one adapted projection."""

    rank: int
    scale: float


@dataclass(frozen=True)
class AdapterConfig:
    """A PEFT LoRA/DoRA config resolved against one base model."""

    targets: Mapping[tuple[int, str], TargetSpec]  # (layer index, HF projection name) -> rank, scale
    use_dora: bool

    @property
    def max_rank(self) -> int:
        return max(spec.rank for spec in self.targets.values())

    @property
    def target_modules(self) -> tuple[str, ...]:
        """The HF projection names the adapter touches in at least one layer, in model order."""
        return tuple(dict.fromkeys(name for _, name in self.targets))


def read_adapter_config(
    path: Path, num_layers: int, max_lora_rank: int, modules: ModuleNames = module_names.LLAMA
) -> AdapterConfig:
    """Read and resolve `adapter_config.json` at `path`."""
    return parse_adapter_config(read_config_file(path), num_layers, max_lora_rank, modules)


def read_config_file(path: Path) -> dict[str, Any]:
    """`adapter_config.json` at `path` as a dict: the one reader of the file, refusing what is not a bounded JSON
    object of at most `MAX_CONFIG_BYTES` (see `server.adapters.safe_json`)."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise AdapterError(f"{CONFIG_FILE} is missing", param=CONFIG_FILE) from None
    except OSError as e:
        raise AdapterError(f"{CONFIG_FILE} cannot be read: {e.strerror}", param=CONFIG_FILE) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{CONFIG_FILE} is over {MAX_CONFIG_BYTES} bytes", param=CONFIG_FILE)
    try:
        return parse_json_object(data)
    except ValueError as e:
        raise AdapterError(f"{CONFIG_FILE}: {e}", param=CONFIG_FILE) from None


def parse_adapter_config(
    raw: Mapping[str, Any], num_layers: int, max_lora_rank: int, modules: ModuleNames = module_names.LLAMA
) -> AdapterConfig:
    """Resolve a PEFT LoRA config dict for a model of `num_layers` layers named as `modules`; raises `AdapterError`
    naming the field."""
    check_config_sizes(raw)
    _check_supported(raw)
    r = _positive_int(raw.get("r", 8), "r")
    alpha = _number(raw.get("lora_alpha", 8), "lora_alpha")
    use_rslora = _flag(raw, "use_rslora")
    rank_pattern = _pattern(raw, "rank_pattern", _positive_int)
    alpha_pattern = _pattern(raw, "alpha_pattern", _number)
    targets = {}
    for key in _targeted_modules(raw, num_layers, modules):
        layer, name = key
        full = modules.projection(layer, name)
        rank_key = _pattern_key(rank_pattern, full)
        rank = rank_pattern.get(rank_key, r)
        if rank > max_lora_rank:
            field = "rank_pattern" if rank_key in rank_pattern else "r"
            raise AdapterError(f"{field}: rank {rank} of {full} exceeds max_lora_rank {max_lora_rank}", param=field)
        a = alpha_pattern.get(_pattern_key(alpha_pattern, full), alpha)
        targets[key] = TargetSpec(rank, a / math.sqrt(rank) if use_rslora else a / rank)
    return AdapterConfig(MappingProxyType(targets), _flag(raw, "use_dora"))


def check_config_sizes(raw: Mapping[str, Any]) -> None:
    """Refuse lists, pattern maps and names longer than the caps, before anything loops over them."""
    for field in (*LIST_FIELDS, "rank_pattern", "alpha_pattern"):
        value = raw.get(field)
        items = value if isinstance(value, list | dict) else [value]
        cap = MAX_PATTERNS if isinstance(value, dict) else MAX_LIST_ITEMS
        if len(items) > cap:
            raise AdapterError(f"{field}: more than {cap} entries", param=field)
        if any(isinstance(text, str) and len(text) > MAX_TEXT_CHARS for text in items):
            raise AdapterError(f"{field}: an entry is longer than {MAX_TEXT_CHARS} characters", param=field)


def show(value: Any) -> str:
    """A short repr of a value from a config, for error messages (which must not echo megabytes back)."""
    return reprlib.repr(value)


def _check_supported(raw: Mapping[str, Any]) -> None:
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"peft_type: {show(raw.get('peft_type'))} is not supported; only LORA", param="peft_type")
    if raw.get("bias", "none") != "none":
        raise AdapterError(f"bias: {show(raw['bias'])} is not supported; only 'none'", param="bias")
    if raw.get("fan_in_fan_out", False) is not False:
        raise AdapterError(
            "fan_in_fan_out: only false is supported (the projections are nn.Linear)", param="fan_in_fan_out"
        )
    if raw.get("modules_to_save"):
        raise AdapterError(
            "modules_to_save: adapters that replace whole modules are not supported", param="modules_to_save"
        )
    init = str(raw.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_CHANGING_INITS):
        raise AdapterError(
            f"init_lora_weights: {show(init)} adapters need the base weights they modified; convert it "
            "to a plain LoRA adapter first",
            param="init_lora_weights",
        )
    for field, value in raw.items():
        if field in INERT_FIELDS or field in HANDLED_FIELDS:
            continue
        if value not in (None, False, [], {}, ""):
            raise AdapterError(f"{field}: not supported by this server (got {show(value)})", param=field)


@dataclass(frozen=True)
class _Targeting:
    """PEFT's module-selection fields, validated; `matches` is PEFT's `check_target_module_exists`."""

    target: str | list[str]  # regex (fullmatch) or names (suffix match)
    exclude: str | list[str] | None
    layers: int | list[int] | None  # layers_to_transform, list targets only
    patterns: list[str] | None  # layers_pattern

    def matches(self, key: str) -> bool:
        if isinstance(self.exclude, str) and re.fullmatch(self.exclude, key):
            return False
        if isinstance(self.exclude, list) and any(key == e or key.endswith(f".{e}") for e in self.exclude):
            return False
        if isinstance(self.target, str):
            return re.fullmatch(self.target, key) is not None
        if key in self.target:
            return True
        if not any(key.endswith(f".{t}") for t in self.target):
            return False
        if self.layers is None or self.layers == []:
            return True
        if not self.patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            match = next((m for p in self.patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key))), None)
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == self.layers if isinstance(self.layers, int) else index in self.layers


def _targeting(raw: Mapping[str, Any], modules: ModuleNames) -> _Targeting:
    target, layers, patterns = raw.get("target_modules"), raw.get("layers_to_transform"), raw.get("layers_pattern")
    if isinstance(target, str) and target.lower() == "all-linear":
        target = list(modules.targets)
    if isinstance(target, str):
        if layers is not None or patterns is not None:
            field = "layers_to_transform" if layers is not None else "layers_pattern"
            raise AdapterError(f"{field}: cannot be used when target_modules is a regex string", param=field)
        _compile(target, "target_modules")
    elif not (isinstance(target, list) and target and all(isinstance(t, str) for t in target)):
        raise AdapterError(
            "target_modules: must be a non-empty list of names or a regex string", param="target_modules"
        )
    if layers is not None and not (_is_int(layers) or (isinstance(layers, list) and all(map(_is_int, layers)))):
        raise AdapterError("layers_to_transform: must be an integer or a list of integers", param="layers_to_transform")
    if isinstance(patterns, str):
        patterns = [patterns]
    if patterns is not None and not (isinstance(patterns, list) and all(isinstance(p, str) for p in patterns)):
        raise AdapterError("layers_pattern: must be a string or a list of strings", param="layers_pattern")
    for pattern in patterns or []:
        _compile(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", "layers_pattern")
    exclude = raw.get("exclude_modules") or None
    if isinstance(exclude, str):
        _compile(exclude, "exclude_modules")
    elif exclude is not None and not (isinstance(exclude, list) and all(isinstance(e, str) for e in exclude)):
        raise AdapterError("exclude_modules: must be a list of names or a regex string", param="exclude_modules")
    return _Targeting(target, exclude, layers, patterns)


def _targeted_modules(raw: Mapping[str, Any], num_layers: int, modules: ModuleNames) -> list[tuple[int, str]]:
    """(layer, projection) pairs PEFT would wrap, after refusing targets that are not projections of this model."""
    targeting = _targeting(raw, modules)
    _refuse_foreign_targets(targeting, num_layers, modules)
    found = [(i, n) for i in range(num_layers) for n in modules.targets if targeting.matches(modules.projection(i, n))]
    if not found:
        raise AdapterError("target_modules: the adapter targets no projection of this model", param="target_modules")
    return found


def _refuse_foreign_targets(targeting: _Targeting, num_layers: int, modules: ModuleNames) -> None:
    """Every target must name projections of this model; embeddings, the LM head, norms or other models' layers fail."""
    projections = modules.all_projections(num_layers)
    others = modules.others(num_layers)
    is_regex = isinstance(targeting.target, str)
    for entry in [targeting.target] if is_regex else targeting.target:
        one = replace(targeting, target=entry if is_regex else [entry], layers=None)
        hit = next((m for m in others if one.matches(m)), None)
        if hit is not None:
            raise AdapterError(
                f"target_modules: {show(entry)} targets {hit}, which adapters cannot change on this server "
                f"(supported: {', '.join(modules.targets)})",
                param="target_modules",
            )
        if not any(one.matches(m) for m in projections):
            raise AdapterError(
                f"target_modules: {show(entry)} matches no projection of this model "
                f"(supported: {', '.join(modules.targets)})",
                param="target_modules",
            )


def _pattern_key(pattern: Mapping[str, Any], key: str) -> str:
    """PEFT's `get_pattern_key`: the first pattern matching a suffix of the module name, else the name itself."""
    return next((p for p in pattern if re.match(rf"(.*\.)?({p})$", key)), key)


def _pattern(raw: Mapping[str, Any], field: str, check: Callable[[Any, str], Any]) -> dict[str, Any]:
    value = raw.get(field) or {}
    if not isinstance(value, dict):
        raise AdapterError(f"{field}: must be an object mapping module patterns to values", param=field)
    for key in value:
        _compile(rf"(.*\.)?({key})$", field)
    return {key: check(v, field) for key, v in value.items()}


def _compile(pattern: str, field: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise AdapterError(f"{field}: invalid regular expression in {show(pattern)}: {e}", param=field) from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _positive_int(value: Any, field: str) -> int:
    if not _is_int(value) or value < 1:
        raise AdapterError(f"{field}: rank must be a positive integer (got {show(value)})", param=field)
    return value


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AdapterError(f"{field}: must be a finite number (got {show(value)})", param=field)
    return float(value)


def _flag(raw: Mapping[str, Any], field: str) -> bool:
    value = raw.get(field, False)
    if not isinstance(value, bool):
        raise AdapterError(f"{field}: must be true or false (got {show(value)})", param=field)
    return value
