"""`loraplex serve`: flags come from Settings, precedence is flag > env var > default, and serve wires the app."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import wait_until_healthy
from fake_engine import FakeEngine
from fastapi import FastAPI

from server import cli
from server.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def parse(*argv: str) -> Settings:
    parser = cli.build_parser()
    args = parser.parse_args(["serve", *argv])
    return cli.settings_from_args(args, parser)


def test_help_lists_every_field_with_its_env_var(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in help_text
        assert f"LORAPLEX_{name.upper()}" in help_text
    assert "default: 536870912" in help_text


def test_flags_parse_into_typed_settings() -> None:
    settings = parse("--port", "9000", "--device", "cpu", "--model", "/models/x", "--kv-cache-bytes", "1024")
    assert settings.port == 9000
    assert settings.device == "cpu"
    assert str(settings.model) == "/models/x"
    assert settings.kv_cache_bytes == 1024


def test_flag_beats_env_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_PORT", "7000")
    monkeypatch.setenv("LORAPLEX_HOST", "0.0.0.0")
    settings = parse("--port", "9000")
    assert settings.port == 9000
    assert settings.host == "0.0.0.0"
    assert settings.block_size == Settings.model_fields["block_size"].default


def test_list_flags_repeat_and_their_env_vars_read_json(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse("--merged", "a", "--merged", "b").merged == ["a", "b"]
    assert parse().merged == []
    monkeypatch.setenv("LORAPLEX_AUTO_MERGE", '["x", "y"]')
    assert parse().auto_merge == ["x", "y"]
    assert parse("--auto-merge", "z").auto_merge == ["z"]


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--port", "abc"], {}, "--port"),
        (["--port", "70000"], {}, "--port"),
        (["--device", "tpu"], {}, "--device"),
        ([], {"LORAPLEX_BLOCK_SIZE": "0"}, "LORAPLEX_BLOCK_SIZE"),
    ],
)
def test_invalid_values_are_usage_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], env: dict, named: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2


async def test_serve_runs_uvicorn_on_the_engine_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = FakeEngine()
    monkeypatch.setattr("server.engine.factory.build_engine", lambda settings, metrics: engine)
    served: dict[str, Any] = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: served.update(app=app, **kwargs))

    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "8123"]) == 0

    assert (served["host"], served["port"]) == ("0.0.0.0", 8123)
    app: FastAPI = served["app"]
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test")
    async with app.router.lifespan_context(app), client:
        await wait_until_healthy(client)
        assert (await client.get("/v1/models")).json()["data"][0]["id"] == engine.served_model_name
    assert engine.shut_down


def test_python_dash_m_server() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "--kv-cache-bytes" in result.stdout


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported; supported: "),
        ({"hidden_size": 96}, "has shape [64, 64] where config.json implies [64, 96]"),
    ],
)
def test_serve_exits_with_the_reason_when_the_checkpoint_cannot_be_served(
    tiny_model_dir: Path, tmp_path: Path, change: dict, message: str
) -> None:
    """An orchestrator learns at once why: exit status 1 and the message, not a server answering 503 forever."""
    import json
    import shutil

    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text()) | change
    (folder / "config.json").write_text(json.dumps(config))
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--model", str(folder), "--port", "1"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 1
    assert message in result.stderr
