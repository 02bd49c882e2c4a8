"""Sampling defaults for the fields a request leaves out, as vLLM's `--generation-config` reads them.

A model folder's `generation_config.json` may recommend temperature, top_p, top_k, min_p and repetition_penalty
(SmolLM2's card: temperature 0.2, top_p 0.9). With `--generation-config auto` requests that omit one of these get the
model's value; `vllm` ignores the file; a folder path reads that folder's file instead. `--override-generation-config`
(a JSON object of the same fields) wins over both. A field nobody sets keeps the engine's own default
(`SamplingParams`): temperature 1, every filter and penalty off.

As vLLM does, only these five keys are read and `do_sample` is ignored. The file is read as written (a value equal to
Hugging Face's own default, like top_k 50, still counts), not through transformers, which adds its defaults.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from server.engine.sequence import SamplingParams
from server.errors import ConfigurationError, InvalidRequestError

log = logging.getLogger(__name__)

FILE_NAME = "generation_config.json"


@dataclass(frozen=True)
class GenerationDefaults:
    """Values for the defaulted sampling fields; None: the engine's own default applies."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # 0 (or -1) disables top-k
    min_p: float | None = None
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        SamplingParams(**self.as_dict())  # the engine's own checks, naming the field at fault

    def as_dict(self) -> dict[str, float | int]:
        """The fields that are set, as /v1/models shows them."""
        return {name: value for name, value in asdict(self).items() if value is not None}

    def updated(self, other: GenerationDefaults) -> GenerationDefaults:
        """These defaults with `other`'s set fields winning."""
        return replace(self, **other.as_dict())

    @classmethod
    def from_mapping(cls, values: Mapping[str, object], source: str | None, *, strict: bool) -> GenerationDefaults:
        """The defaulted fields of `values` (a generation config); `strict` refuses any other key.

        Raises ConfigurationError naming the field (and `source`, when given) for a value of the wrong type or out of
        range.
        """
        fields = cls.__dataclass_fields__
        unknown = sorted(set(values) - set(fields))
        if strict and unknown:
            raise ConfigurationError(
                _at(source, f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(fields)}"),
                param=unknown[0],
            )
        picked = {name: _typed(name, values[name], source) for name in fields if values.get(name) is not None}
        try:
            return cls(**picked)
        except InvalidRequestError as exc:
            raise ConfigurationError(_at(source, exc.message), param=exc.param) from exc


def parse_overrides(text: str) -> GenerationDefaults:
    """`--override-generation-config`'s JSON object, checked; ConfigurationError says what is wrong with it."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"not valid JSON ({exc})") from exc
    if not isinstance(values, dict):
        raise ConfigurationError('must be a JSON object, like {"temperature": 0.5}')
    return GenerationDefaults.from_mapping(values, None, strict=True)


def load_generation_defaults(model_dir: Path, source: str, overrides: str | None) -> GenerationDefaults:
    """The defaults requests get: `source` ("auto": the model folder's file, "vllm": none, else a folder holding
    one) with `overrides` (a JSON object) on top; each part is logged. ConfigurationError when one is unusable."""
    if source == "vllm":
        from_model = GenerationDefaults()
    else:
        from_model = _read(model_dir, required=False) if source == "auto" else _read(Path(source), required=True)
    if from_model.as_dict():
        log.info("default sampling params from model: %s", from_model.as_dict())
    defaults = from_model
    if overrides:
        override = parse_overrides(overrides)
        log.info("default sampling params from --override-generation-config: %s", override.as_dict())
        defaults = from_model.updated(override)
    return defaults


def _read(folder: Path, required: bool) -> GenerationDefaults:
    """The defaults `folder`'s generation config sets; none when it has no file and need not have one."""
    path = folder / FILE_NAME
    if not path.is_file():
        if required:
            raise ConfigurationError(f"--generation-config {folder}: no {FILE_NAME} there (or use auto or vllm)")
        return GenerationDefaults()  # a model without recommendations: the engine's own defaults
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigurationError(f"{path} cannot be read as JSON: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigurationError(f"{path} must hold a JSON object")
    return GenerationDefaults.from_mapping(values, str(path), strict=False)


def _typed(name: str, value: object, source: str | None) -> float | int:
    """A JSON number as the field's type: top_k an integer (3.0 is 3), the others floats; anything else refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(_at(source, f"{name} must be a number, got {value!r}"), param=name)
    if name != "top_k":
        return float(value)
    if not float(value).is_integer():
        raise ConfigurationError(_at(source, f"top_k must be an integer, got {value!r}"), param=name)
    return max(int(value), 0)  # -1 disables top-k, as 0 does


def _at(source: str | None, message: str) -> str:
    return message if source is None else f"{source}: {message}"
