"""schemathesis (`run --checks all`) against the real server process on a tiny model: every check passes.

The generation, tokenizer and admin routes are fuzzed from /openapi.json, with the admin token, in positive and negative
modes and as stateful sequences; no answer may be a 5xx, undocumented, off its declared schema or headers, or
accept data the schema forbids. Bounds are set small so that schema-valid requests finish fast on 2 cores.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import make_peft_adapter, make_tiny_checkpoint
from tests.test_server_e2e import start_server

TOKEN = "fuzz-token"
CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES_PER_OPERATION = 25  # about a minute on 2 cores


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("fuzz")
    model = make_tiny_checkpoint(root / "model")
    make_peft_adapter(model, root / "store" / "qv", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    proc, url = start_server(
        model, "--adapters-store", str(root / "store"), "--admin-token", TOKEN, "--served-model-name", "tiny",
        "--kv-cache-bytes", str(2**24), "--max-num-seqs", "4", "--max-queue", "8", "--max-n", "2",
        "--max-prompts", "4", "--max-messages", "8", "--max-text-chars", "1024", "--max-request-bytes", "65536",
        "--max-adapter-bytes", str(2**20),
    )  # fmt: skip
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_schemathesis_finds_no_failure(fuzzed_server: str, tmp_path: Path) -> None:
    command = [
        str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(CONFIG), "run",
        f"{fuzzed_server}/openapi.json", "--checks", "all", "-H", f"Authorization: Bearer {TOKEN}",
        "--include-path-regex", "^/(v1/|admin/|tokenize|detokenize)", "--max-examples", str(EXAMPLES_PER_OPERATION),
        "--workers", "1", "--seed", "20261125", "--request-timeout", "60", "--generation-database", "none",
        "--no-color",
    ]  # fmt: skip
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-20_000:] + run.stderr[-5_000:]
    assert httpx.get(f"{fuzzed_server}/health", timeout=10).status_code == 200
