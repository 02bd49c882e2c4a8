"""Adapter folders loaded by path: only under the root, symlinks followed before the check, files read safely."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.adapters.local_folders import adapter_files, opened
from server.errors import InvalidRequestError, PermissionDeniedError, UnsupportedMediaError


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root" / "team" / "sql"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return tmp_path / "root"


def test_a_folder_under_the_root_gives_its_two_files(root: Path) -> None:
    config, weights = adapter_files(root, "team/sql")
    assert (config.name, weights.name) == ("adapter_config.json", "adapter_model.safetensors")
    assert adapter_files(root, str(root / "team" / "sql")) == (config, weights)  # absolute, the same
    assert adapter_files(root, "team/../team/sql") == (config, weights)
    with opened((config, weights)) as (config_file, weights_file):
        assert (config_file.read(), weights_file.read()) == (b"{}", b"weights")


def test_nothing_is_loaded_by_path_without_a_root(root: Path) -> None:
    with pytest.raises(PermissionDeniedError, match="--lora-path-root") as error:
        adapter_files(None, str(root / "team" / "sql"))
    assert error.value.param == "lora_path"


@pytest.mark.parametrize("path", ["..", "team/../..", "/", "/etc", "/no/such/thing"])
def test_paths_outside_the_root_are_refused_whether_or_not_they_exist(root: Path, path: str) -> None:
    with pytest.raises(PermissionDeniedError, match="outside"):
        adapter_files(root, path)


def test_a_symlink_leading_out_is_refused_and_one_staying_in_is_followed(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "out").symlink_to(outside)
    (root / "in").symlink_to(root / "team" / "sql")
    with pytest.raises(PermissionDeniedError):
        adapter_files(root, "out")
    assert adapter_files(root, "in") == adapter_files(root, "team/sql")


def test_a_fifo_in_place_of_the_weights_is_never_opened(root: Path) -> None:
    weights = root / "team" / "sql" / "adapter_model.safetensors"
    weights.unlink()
    os.mkfifo(weights)  # opening it would block the server until someone writes to it
    with pytest.raises(InvalidRequestError, match=r"holds no adapter_model\.safetensors"):
        adapter_files(root, "team/sql")


def test_pickled_weights_are_415(root: Path) -> None:
    (root / "team" / "sql" / "adapter_model.safetensors").rename(root / "team" / "sql" / "adapter_model.bin")
    with pytest.raises(UnsupportedMediaError, match=r"adapter_model\.bin"):
        adapter_files(root, "team/sql")


def test_a_file_gone_since_it_was_looked_at_is_400(root: Path) -> None:
    files = adapter_files(root, "team/sql")
    files[1].unlink()
    with pytest.raises(InvalidRequestError, match="cannot be read"), opened(files):
        pass
