"""Shared fixtures: tiny random-weight Llama checkpoints built in-process, and the real default model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU in its interpreter; read as Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers import make_tiny_checkpoint  # imports Triton (through transformers)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-weight Llama (2 layers, hidden 64, GQA 4/2) saved as a safetensors checkpoint."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from server.model.default_model import default_model_dir as prepared

    return prepared()


@pytest.fixture(scope="session", autouse=True)
def _exact_dtype() -> Iterator[None]:
    """The suite serves in float32, the exact mode its transformers/PEFT comparisons hold in, whatever `--dtype auto`
    picks on this CPU (servers started as subprocesses inherit it); a test of another dtype passes `dtype` itself."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAPLEX_DTYPE", "float32")
        yield


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`cuda`-marked tests need a GPU; without one they skip (CI has none, `bench/gpu_check.sh` runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
