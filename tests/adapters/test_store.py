"""The store: names confined to the root, atomic commit/replace/detach, and recovery from interrupted changes."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from server.adapters.store import CONFIG_FILE, META_FILE, AdapterMeta, AdapterStore, check_name
from server.errors import ConflictError, InvalidRequestError, NotFoundError

BAD_NAMES = ["../x", "/etc/passwd", "a/b", ".", "..", "a" * 65, "ünï", "", " x", "x\n", "-x", ".hidden", "a\\b", "x@1"]


def make_folder(path: Path, marker: str) -> Path:
    path.mkdir(parents=True)
    (path / CONFIG_FILE).write_text(json.dumps({"marker": marker}))
    (path / "adapter_model.safetensors").write_bytes(marker.encode())
    return path


def marker(store: AdapterStore, name: str) -> str:
    return json.loads((store.path(name) / CONFIG_FILE).read_text())["marker"]


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused(tmp_path, name):
    store = AdapterStore(tmp_path)
    with pytest.raises(InvalidRequestError, match="invalid adapter name") as info:
        store.path(name)
    assert info.value.param == "name"
    assert not store.exists(name)


@pytest.mark.parametrize("name", ["a", "A.b_c-9", "x" * 64, "v1.2"])
def test_good_names(tmp_path, name):
    assert check_name(name) == name
    assert AdapterStore(tmp_path).path(name) == (tmp_path / name).resolve()


def test_a_symlink_out_of_the_store_is_refused(tmp_path):
    outside = make_folder(tmp_path / "outside", "o")
    store = AdapterStore(tmp_path / "store")
    store.root.mkdir()
    (store.root / "link").symlink_to(outside)
    with pytest.raises(InvalidRequestError, match="leaves the store"):
        store.path("link")


def test_commit_then_replace_then_detach(tmp_path):
    store = AdapterStore(tmp_path / "store")
    staged = store.stage()
    (staged / CONFIG_FILE).write_text(json.dumps({"marker": "v1"}))
    assert store.commit(staged, "a", replace=False) is None
    assert store.names() == ["a"] and marker(store, "a") == "v1"

    again = store.stage()
    (again / CONFIG_FILE).write_text(json.dumps({"marker": "v2"}))
    with pytest.raises(ConflictError):
        store.commit(again, "a", replace=False)
    aside = store.commit(again, "a", replace=True)
    assert marker(store, "a") == "v2" and aside is not None and aside.name.startswith(".old-")
    store.purge(aside)
    assert hidden(store.root) == []

    gone = store.detach("a")
    assert store.names() == [] and not store.exists("a")
    store.purge(gone)
    assert list(store.root.iterdir()) == []
    with pytest.raises(NotFoundError):
        store.detach("a")


def test_listing_skips_hidden_and_incomplete_folders(tmp_path):
    store = AdapterStore(tmp_path)
    make_folder(tmp_path / "b", "b")
    make_folder(tmp_path / "a", "a")
    make_folder(tmp_path / ".tmp-12345678", "staged")
    (tmp_path / "no-config").mkdir()
    (tmp_path / "file").write_text("x")
    assert store.names() == ["a", "b"]


def _age(root: Path, seconds: float = 60) -> None:
    """Date the root's last change `seconds` back: past the window in which a listing scans every time."""
    then = time.time() - seconds
    os.utime(root, (then, then))


def test_a_listing_reads_the_folders_again_only_when_the_root_changed(tmp_path, monkeypatch):
    store = AdapterStore(tmp_path)
    make_folder(tmp_path / "a", "a")
    (tmp_path / "b").mkdir()  # a folder still being written: no config yet
    scans = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: (path == store.root and scans.append(path)) or real_scandir(path))
    assert store.names() == ["a"] and len(scans) == 1  # the root changed just now: scanned every time
    assert store.names() == ["a"] and len(scans) == 2
    _age(tmp_path)
    assert store.names() == ["a"] and len(scans) == 3
    assert store.names() == ["a"] and len(scans) == 3  # unchanged root: the last scan stands
    (tmp_path / "b" / CONFIG_FILE).write_text("{}")  # the root's mtime does not move for this
    assert store.names() == ["a", "b"] and len(scans) == 3  # folders without config are looked at each time
    make_folder(tmp_path / "c", "c")
    _age(tmp_path, 30)
    assert store.names() == ["a", "b", "c"] and len(scans) == 4
    shutil.rmtree(tmp_path / "a")
    _age(tmp_path, 20)
    assert store.names() == ["b", "c"] and len(scans) == 5
    store.detach("b")  # the store's own changes move the root's mtime too
    assert store.names() == ["c"]
    shutil.rmtree(tmp_path)
    assert store.names() == []


def test_meta_round_trip_and_defaults(tmp_path):
    store = AdapterStore(tmp_path)
    folder = make_folder(tmp_path / "a", "a")
    assert store.read_meta("a") == AdapterMeta(created_at=int(folder.stat().st_mtime))
    store.write_meta(folder, AdapterMeta("merged", True, 123))
    assert store.read_meta("a") == AdapterMeta("merged", True, 123)
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, "adapter_model.safetensors", META_FILE]
    (folder / META_FILE).write_text('{"mode": "sideways"}')
    assert store.read_meta("a").mode == "unmerged"


def test_recover_finishes_or_undoes_interrupted_changes(tmp_path):
    store = AdapterStore(tmp_path)
    make_folder(tmp_path / "kept", "kept")
    make_folder(tmp_path / ".tmp-0a1b2c3d", "half-written upload")
    make_folder(tmp_path / ".del-0a1b2c3d", "half-deleted")
    make_folder(tmp_path / ".old-0a1b2c3d-replaced", "old, new one already in")
    make_folder(tmp_path / "replaced", "new")
    make_folder(tmp_path / ".old-99999999-orphan", "old, new one never came")
    (tmp_path / "kept" / f".{META_FILE}.deadbeef").write_text("{")
    store.recover()
    assert store.names() == ["kept", "orphan", "replaced"]
    assert marker(store, "orphan") == "old, new one never came"
    assert marker(store, "replaced") == "new"
    assert hidden(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [CONFIG_FILE, "adapter_model.safetensors"]


def test_purge_only_touches_hidden_folders_of_the_store(tmp_path):
    store = AdapterStore(tmp_path / "store")
    live = make_folder(store.root / "live", "live")
    store.purge(live)
    store.purge(tmp_path)
    assert store.names() == ["live"]
