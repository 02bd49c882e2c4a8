"""`loraplex adapters list|add|rm|verify` on a store directory, offline, with the upload's checks."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from server.adapters.store import META_FILE
from server.cli import main
from tests.helpers import make_peft_adapter


@pytest.fixture(scope="module")
def sources(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-sources")
    good = make_peft_adapter(tiny_model_dir, root / "good", r=4, target_modules=["q_proj", "v_proj"])
    nan = shutil.copytree(good, root / "nan")
    tensors = load_file(nan / "adapter_model.safetensors")
    next(t for name, t in sorted(tensors.items()) if "lora_A" in name).fill_(float("nan"))
    save_file(tensors, nan / "adapter_model.safetensors")
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(good / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not unpickled")
    return {"good": good, "nan": nan, "pickled": pickled}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_add_list_replace_and_remove(tmp_path, tiny_model_dir, sources, capsys):
    store, model = str(tmp_path / "store"), str(tiny_model_dir)
    status, out, _ = run(capsys, "adapters", "--store", store, "add", "sql", str(sources["good"]), "--model", model,
                         "--mode", "merged", "--pinned")  # fmt: skip
    assert status == 0 and out.startswith("added sql")
    assert json.loads((tmp_path / "store" / "sql" / META_FILE).read_text())["mode"] == "merged"
    status, out, _ = run(capsys, "adapters", "--store", store, "list")
    fields = out.splitlines()[1].split()
    size = (sources["good"] / "adapter_model.safetensors").stat().st_size
    assert status == 0 and fields == ["sql", "4", "8", "False", "F32", str(size), "merged", "True"]
    status, _, err = run(capsys, "adapters", "--store", store, "add", "sql", str(sources["good"]), "--model", model)
    assert status == 1 and err == "loraplex: sql: adapter 'sql' already exists; add --replace to overwrite it\n"
    args = ("adapters", "--store", store, "add", "sql", str(sources["good"]), "--model", model, "--replace")
    assert run(capsys, *args)[0] == 0
    assert run(capsys, "adapters", "--store", store, "rm", "sql")[0] == 0
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == []
    status, _, err = run(capsys, "adapters", "--store", store, "rm", "sql")
    assert status == 1 and "is not in the store" in err


def test_add_refuses_a_bad_adapter_and_leaves_the_store_alone(tmp_path, tiny_model_dir, sources, capsys):
    store = str(tmp_path / "store")
    status, _, err = run(capsys, "adapters", "--store", store, "add", "x", str(sources["nan"]), "--model",
                         str(tiny_model_dir))  # fmt: skip
    assert status == 1 and "NaN" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == []
    status, _, err = run(capsys, "adapters", "--store", store, "add", "../x", str(sources["good"]), "--model",
                         str(tiny_model_dir))  # fmt: skip
    assert status == 1 and "invalid adapter name" in err


def test_verify_prints_one_line_per_problem(tmp_path, tiny_model_dir, sources, capsys):
    store = tmp_path / "store"
    for name, source in sources.items():
        shutil.copytree(source, store / name)
    status, out, err = run(capsys, "adapters", "--store", str(store), "verify", "--model", str(tiny_model_dir))
    assert status == 1
    assert out.startswith("ok good (rank 4, sha256 ")
    lines = err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("loraplex: nan: tensor ") and "NaN" in lines[0]
    assert lines[1].startswith("loraplex: pickled: adapter_model.bin: pickled weights are refused")
    status, out, _ = run(capsys, "adapters", "verify", str(sources["good"]), "--model", str(tiny_model_dir))
    assert status == 0 and out.startswith(f"ok {sources['good']}")
