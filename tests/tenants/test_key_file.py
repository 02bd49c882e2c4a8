"""The API keys file: TOML and JSON read alike, strictly; every mistake is named with its place in the file."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from server.errors import KeyFileError
from server.tenants.keyfile import KeyFile, read_key_file, to_toml, write_key_file
from server.tenants.keys import hash_key

HASH_A, HASH_B = hash_key("lpx-a"), hash_key("lpx-b")
TOML = f"""
# comments are fine
[[tenants]]
name = "acme"
keys = ["{HASH_A}"]
adapters = ["acme-*", "shared"]
requests_per_minute = 60
tokens_per_minute = 1000
concurrent_requests = 4

[[tenants]]
name = "base-only"
keys = ["{HASH_B}"]
base_model = true
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_toml_and_json_read_the_same(tmp_path: Path) -> None:
    from_toml = read_key_file(write(tmp_path, "k.toml", TOML))
    from_json = read_key_file(write(tmp_path, "k.json", from_toml.model_dump_json()))
    assert from_toml == from_json
    acme, base_only = from_toml.tenants
    assert (acme.name, acme.keys, acme.adapters, acme.base_model) == ("acme", [HASH_A], ["acme-*", "shared"], False)
    assert (acme.requests_per_minute, acme.tokens_per_minute, acme.concurrent_requests) == (60, 1000, 4)
    assert (base_only.adapters, base_only.base_model, base_only.requests_per_minute) == ([], True, None)


@pytest.mark.parametrize("name", ["k.toml", "k.json"])
def test_write_round_trips_atomically_and_privately(tmp_path: Path, name: str) -> None:
    keys = read_key_file(write(tmp_path, "source.toml", TOML))
    path = tmp_path / name
    write_key_file(path, keys)
    assert read_key_file(path) == keys
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["source.toml", name])  # no temporary file left


def test_empty_files_hold_no_tenants(tmp_path: Path) -> None:
    assert read_key_file(write(tmp_path, "k.toml", "")).tenants == []
    assert to_toml(KeyFile()) == "tenants = []\n"
    assert read_key_file(write(tmp_path, "e.toml", to_toml(KeyFile()))).tenants == []


def tenant(**fields) -> str:
    return json.dumps({"tenants": [{"name": "acme", "keys": [HASH_A], **fields}]})


PROBLEMS = [
    ("k.yaml", "", "name it *.toml or *.json"),
    ("k.toml", "[[tenants]\nname=", "not valid TOML"),
    ("k.json", "[1, 2", "not valid JSON"),
    ("k.json", "[]", "the top level must be an object holding a 'tenants' list"),
    ("k.json", '{"tenant": []}', "tenant: Extra inputs are not permitted"),
    ("k.json", tenant(scope=["x"]), "tenants[0].scope: Extra inputs are not permitted"),
    ("k.json", tenant(name="a b"), "tenants[0].name: use 1-64 ASCII letters"),
    ("k.json", tenant(name="other"), "tenants[0].name: 'other' is reserved"),
    ("k.json", tenant(keys=["lpx-a"]), "tenants[0].keys[0]: a key must be stored as 'sha256:'"),
    ("k.json", tenant(keys=[HASH_A.upper()]), "tenants[0].keys[0]"),
    ("k.json", tenant(keys=[HASH_A[:-1]]), "tenants[0].keys[0]"),
    ("k.json", tenant(keys=HASH_A), "tenants[0].keys: Input should be a valid list"),
    ("k.json", tenant(adapters=["a/b"]), "tenants[0].adapters[0]: adapter pattern 'a/b' may hold only"),
    ("k.json", tenant(adapters=[""]), "tenants[0].adapters[0]"),
    ("k.json", tenant(base_model=1), "tenants[0].base_model: Input should be a valid boolean"),
    ("k.json", tenant(requests_per_minute=True), "tenants[0].requests_per_minute"),
    ("k.json", tenant(tokens_per_minute=0), "tenants[0].tokens_per_minute: Input should be greater than 0"),
    ("k.json", tenant(concurrent_requests="4"), "tenants[0].concurrent_requests"),
    ("k.json", json.dumps({"tenants": [{"name": "a"}, {"name": "a"}]}), "tenant 'a' is listed twice"),
    ("k.json", json.dumps({"tenants": [{"name": "a", "keys": [HASH_A]}, {"name": "b", "keys": [HASH_A]}]}),
     "one key hash is listed for both 'a' and 'b'"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "text", "message"), PROBLEMS)
def test_problems_are_named(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(KeyFileError) as error:
        read_key_file(path)
    assert message in error.value.message
    assert error.value.message.startswith(f"API keys file {path}")


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read it"):
        read_key_file(tmp_path / "missing.toml")


def test_errors_never_echo_the_values(tmp_path: Path) -> None:
    path = write(tmp_path, "k.json", tenant(keys=["lpx-secret-in-clear"]))
    with pytest.raises(KeyFileError) as error:
        read_key_file(path)
    assert "lpx-secret-in-clear" not in error.value.message
