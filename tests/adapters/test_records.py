"""Adapter records read from the files alone, and the format check that names pickles and zips."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import struct

import pytest
import torch

from server.adapters.records import describe_adapter_dir, read_safetensors_header
from server.adapters.weights import WEIGHTS_FILE
from server.errors import AdapterError, UnsupportedMediaError
from tests.helpers import make_peft_adapter


@pytest.fixture(scope="module")
def dora_adapter(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("records") / "dora"
    return make_peft_adapter(
        tiny_model_dir, path, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "o_proj"]
    )


def test_record_of_a_peft_folder(dora_adapter):
    record = describe_adapter_dir(dora_adapter)
    data = (dora_adapter / WEIGHTS_FILE).read_bytes()
    assert (record.rank, record.alpha, record.dora, record.dtype) == (4, 8.0, True, "F32")
    assert sorted(record.target_modules) == ["o_proj", "q_proj"]
    assert record.size_bytes == len(data) and record.sha256 == hashlib.sha256(data).hexdigest()


def torch_zip() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "error", "reason"),
    [
        (pickle.dumps({"w": [0.0]}), UnsupportedMediaError, "pickle"),
        (torch_zip(), UnsupportedMediaError, "zip archive"),
        (b"", AdapterError, "not a safetensors file"),
        (b"hello, world, not tensors", AdapterError, "header length"),
        (struct.pack("<Q", 10) + b"{not json}", AdapterError, "not a JSON object"),
        (struct.pack("<Q", 2**40) + b"{}", AdapterError, "header length"),
        (struct.pack("<Q", 2) + b"[]", AdapterError, "not a JSON object"),
    ],
)
def test_files_that_are_not_safetensors_are_named(tmp_path, content, error, reason):
    file = tmp_path / WEIGHTS_FILE
    file.write_bytes(content)
    with pytest.raises(error, match=reason) as info:
        read_safetensors_header(file)
    assert info.value.param == WEIGHTS_FILE


def test_a_broken_config_is_reported(dora_adapter, tmp_path):
    folder = shutil.copytree(dora_adapter, tmp_path / "copy")
    (folder / "adapter_config.json").write_text(json.dumps({"r": "eight", "target_modules": ["q_proj"]}))
    with pytest.raises(AdapterError, match="r: must be an integer"):
        describe_adapter_dir(folder)
    (folder / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterError, match="JSON object"):
        describe_adapter_dir(folder)
