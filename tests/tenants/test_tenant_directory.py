"""The live set of tenants: keys resolve to accounts, reloads swap everything or nothing and keep usage."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.errors import KeyFileError, QuotaExceededError
from server.tenants.directory import TenantDirectory
from server.tenants.keyfile import KeyFile, write_key_file
from server.tenants.keys import hash_key
from server.tenants.scope import Scope


def write(path: Path, *tenants: dict) -> None:
    write_key_file(path, KeyFile.model_validate({"tenants": list(tenants)}))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    acme = {"name": "acme", "keys": [hash_key("k1"), hash_key("k2")], "adapters": ["acme-*"], "requests_per_minute": 2}
    write(path, acme, {"name": "globex", "keys": [hash_key("k3")], "base_model": True})
    return path


def test_keys_resolve_to_their_tenant(path: Path) -> None:
    directory = TenantDirectory(path)
    assert directory.authenticate("k1").tenant.name == "acme"
    assert directory.authenticate("k2").tenant.name == "acme"
    assert directory.authenticate("k3").tenant.scope == Scope((), base_model=True)
    assert directory.authenticate("k4") is None
    assert directory.describe() == f"2 tenants with 3 keys from {path}"


def test_reload_keeps_usage_and_applies_new_limits(path: Path) -> None:
    directory = TenantDirectory(path, clock=lambda: 0.0)
    directory.authenticate("k1").admit()
    directory.authenticate("k2").admit()
    with pytest.raises(QuotaExceededError):
        directory.authenticate("k1").admit()
    write(path, {"name": "acme", "keys": [hash_key("k5")], "requests_per_minute": 3})
    directory.reload()
    assert directory.authenticate("k1") is None and directory.authenticate("k3") is None
    account = directory.authenticate("k5")
    assert account.quota.running == 2  # the two requests of before still count
    account.admit()
    with pytest.raises(QuotaExceededError, match="3 requests per minute"):
        account.admit()


def test_an_invalid_reload_keeps_everything(path: Path) -> None:
    directory = TenantDirectory(path)
    before = directory.tenants
    path.write_text("[[tenants]]\nname = 'acme'\nkeys = ['k1']\n")
    with pytest.raises(KeyFileError, match="keys\\[0\\]"):
        directory.reload()
    assert directory.tenants == before
    assert directory.authenticate("k1").tenant.name == "acme"


def test_the_admin_token_is_never_a_tenant_key(path: Path) -> None:
    with pytest.raises(KeyFileError, match="tenant 'globex' is the admin token"):
        TenantDirectory(path, admin_token="k3")
    directory = TenantDirectory(path, admin_token="admin")
    write(path, {"name": "ops", "keys": [hash_key("admin")]})
    with pytest.raises(KeyFileError, match="admin token"):
        directory.reload()
    assert directory.authenticate("k3") is not None


def test_a_broken_file_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read it"):
        TenantDirectory(tmp_path / "missing.json")
