"""Generation defaults: read from a model folder's generation_config.json (--generation-config auto, vllm or a folder),
overridden by --override-generation-config, every bad value refused at start with the field named."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from server.cli import build_parser, settings_from_args
from server.engine.generation_defaults import GenerationDefaults, load_generation_defaults, parse_overrides
from server.errors import ConfigurationError

# As transformers writes it: the sampling fields next to others the engine does not read.
MODEL_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20}


def _model(tmp_path: Path, config: object) -> Path:
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    return tmp_path


def test_auto_reads_the_sampling_fields_of_the_model_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        defaults = load_generation_defaults(_model(tmp_path, MODEL_CONFIG), "auto", None)
    assert defaults.as_dict() == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    assert "default sampling params from model: {'temperature': 0.6, 'top_p': 0.9, 'top_k': 20}" in caplog.text


def test_a_model_without_the_file_has_no_defaults(tmp_path: Path) -> None:
    assert load_generation_defaults(tmp_path, "auto", None) == GenerationDefaults()


def test_vllm_ignores_the_model_folder(tmp_path: Path) -> None:
    assert load_generation_defaults(_model(tmp_path, MODEL_CONFIG), "vllm", None).as_dict() == {}


def test_a_folder_path_reads_that_folder(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    other = _model(tmp_path / "other", {"min_p": 0.1})
    assert load_generation_defaults(_model(tmp_path, MODEL_CONFIG), str(other), None).as_dict() == {"min_p": 0.1}
    with pytest.raises(ConfigurationError, match=r"no generation_config\.json"):
        load_generation_defaults(tmp_path, str(tmp_path / "missing"), None)


def test_overrides_win_field_by_field(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        defaults = load_generation_defaults(_model(tmp_path, MODEL_CONFIG), "auto", '{"temperature": 0.5, "top_k": -1}')
    assert defaults.as_dict() == {"temperature": 0.5, "top_p": 0.9, "top_k": 0}
    assert "--override-generation-config: {'temperature': 0.5, 'top_k': 0}" in caplog.text
    assert load_generation_defaults(tmp_path, "vllm", '{"repetition_penalty": 1.2}').as_dict() == {
        "repetition_penalty": 1.2
    }


@pytest.mark.parametrize(
    ("text", "message", "param"),
    [
        ("{temperature: 1}", "not valid JSON", None),
        ("[0.5]", "must be a JSON object", None),
        ('{"temprature": 0.5}', "unknown field(s) temprature", "temprature"),
        ('{"temperature": "hot"}', "temperature must be a number", "temperature"),
        ('{"temperature": true}', "temperature must be a number", "temperature"),
        ('{"top_k": 2.5}', "top_k must be an integer", "top_k"),
        ('{"top_p": 1.5}', "top_p must be a finite number in (0.0, 1.0]", "top_p"),
        ('{"temperature": -1}', "temperature must be a finite number", "temperature"),
    ],
)
def test_bad_overrides_are_refused_naming_the_problem(text: str, message: str, param: str | None) -> None:
    with pytest.raises(ConfigurationError) as error:
        parse_overrides(text)
    assert message in error.value.message and error.value.param == param


def test_an_out_of_range_model_value_is_refused_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"generation_config\.json: repetition_penalty") as error:
        load_generation_defaults(_model(tmp_path, {"repetition_penalty": 0}), "auto", None)
    assert error.value.param == "repetition_penalty"
    with pytest.raises(ConfigurationError, match="must hold a JSON object"):
        load_generation_defaults(_model(tmp_path, [1]), "auto", None)


def test_flags_reach_the_settings_and_bad_ones_end_the_command(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(["serve", "--generation-config", "vllm", "--override-generation-config", '{"top_k": 5}'])
    settings = settings_from_args(args, parser)
    assert (settings.generation_config, settings.override_generation_config) == ("vllm", '{"top_k": 5}')
    for flag, value in (("--override-generation-config", '{"top_p": 0}'), ("--generation-config", str(tmp_path))):
        with pytest.raises(SystemExit):
            settings_from_args(parser.parse_args(["serve", flag, value]), parser)
        assert f"invalid settings: {flag} / LORAPLEX_" in capsys.readouterr().err
