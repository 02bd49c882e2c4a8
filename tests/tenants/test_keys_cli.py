"""`loraplex keys add|list|rm`: the new key is printed once and only its hash is stored."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import main
from server.tenants.keyfile import read_key_file
from server.tenants.keys import hash_key, key_id


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("name", ["keys.toml", "keys.json"])
def test_add_list_and_remove(tmp_path: Path, capsys, name: str) -> None:
    path = str(tmp_path / name)
    status, out, err = run(capsys, "keys", "--file", path, "add", "acme", "--adapter", "acme-*", "--adapter",
                           "shared", "--requests-per-minute", "60", "--concurrent-requests", "2")  # fmt: skip
    assert status == 0
    first = out.strip()
    assert first.startswith("lpx-") and "\n" not in first
    assert "shown only now" in err and first not in err
    text = Path(path).read_text()
    assert first not in text and hash_key(first) in text

    status, out, _ = run(capsys, "keys", "--file", path, "add", "acme", "--base-model", "--requests-per-minute", "0")
    second = out.strip()
    acme = read_key_file(Path(path)).find("acme")
    assert acme.keys == [hash_key(first), hash_key(second)]
    assert (acme.adapters, acme.base_model, acme.requests_per_minute, acme.concurrent_requests) == (
        ["acme-*", "shared"], True, None, 2)  # fmt: skip

    run(capsys, "keys", "--file", path, "add", "globex")
    status, out, _ = run(capsys, "keys", "--file", path, "list")
    assert status == 0
    assert first not in out and second not in out
    assert key_id(hash_key(first)) in out and key_id(hash_key(second)) in out
    assert [line.split()[0] for line in out.splitlines()] == ["TENANT", "acme", "globex"]

    status, _, err = run(capsys, "keys", "--file", path, "rm", "acme", "--key", key_id(hash_key(first))[:6])
    assert status == 0 and "removed key" in err
    assert read_key_file(Path(path)).find("acme").keys == [hash_key(second)]
    assert run(capsys, "keys", "--file", path, "rm", "globex")[0] == 0
    assert [t.name for t in read_key_file(Path(path)).tenants] == ["acme"]


def test_the_file_comes_from_the_environment(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("LORAPLEX_API_KEYS_FILE", str(tmp_path / "env.toml"))
    assert run(capsys, "keys", "add", "acme")[0] == 0
    assert read_key_file(tmp_path / "env.toml").find("acme") is not None
    monkeypatch.delenv("LORAPLEX_API_KEYS_FILE")
    status, _, err = run(capsys, "keys", "list")
    assert status == 1 and "give --file or set LORAPLEX_API_KEYS_FILE" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["add", "a/b"], "tenants[1].name: use 1-64"), (["add", "acme", "--adapter", "../x"], "tenants[0].adapters[0]"),
     (["add", "acme", "--tokens-per-minute", "-3"], "tokens_per_minute"), (["rm", "nobody"], "no tenant 'nobody'"),
     (["rm", "acme", "--key", "zzzz"], "no key of tenant 'acme'"), (["rm", "acme", "--key", ""], "no key")],
)  # fmt: skip
def test_mistakes_exit_1_and_change_nothing(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    path = tmp_path / "keys.toml"
    run(capsys, "keys", "--file", str(path), "add", "acme")
    before = path.read_text()
    status, out, err = run(capsys, "keys", "--file", str(path), *argv)
    assert status == 1 and out == ""
    assert message in err
    assert path.read_text() == before


def test_an_ambiguous_key_id_is_refused(tmp_path: Path, capsys) -> None:
    path = str(tmp_path / "keys.toml")
    for _ in range(40):  # 40 keys: some two share a first hex digit
        run(capsys, "keys", "--file", path, "add", "acme")
    ids = [key_id(k) for k in read_key_file(Path(path)).find("acme").keys]
    shared = next(i[0] for i in ids if sum(j[0] == i[0] for j in ids) > 1)
    status, _, err = run(capsys, "keys", "--file", path, "rm", "acme", "--key", shared)
    assert status == 1 and "keys of tenant 'acme' has an id starting with" in err


def test_serve_takes_the_file_as_api_keys(tmp_path: Path) -> None:
    from server import cli

    parser = cli.build_parser()
    for flag in ("--api-keys", "--api-keys-file"):
        args = parser.parse_args(["serve", flag, str(tmp_path / "k.toml")])
        assert cli.settings_from_args(args, parser).api_keys_file == tmp_path / "k.toml"
