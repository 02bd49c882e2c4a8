"""A short load run against the real server on a tiny model: every request completes, the report is whole."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from load_tests.cli import main, run_load
from load_tests.workload import LengthRange, Workload
from tests.helpers import make_peft_adapter
from tests.test_server_e2e import _free_port, start_server

REPORT_KEYS = {
    "duration", "completed", "failed", "num_requests", "total_input_tokens", "total_output_tokens",
    "request_throughput", "output_throughput", "total_token_throughput", "errors", "per_adapter", "config",
    *(f"{stat}_{kind}_ms" for stat in ("mean", "median", "p99") for kind in ("ttft", "tpot", "itl", "e2el")),
}  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory) -> Iterator[str]:
    store = tmp_path_factory.mktemp("store")
    for seed, name in enumerate(("sql", "poet")):
        make_peft_adapter(tiny_model_dir, store / name, seed=seed, r=4, lora_alpha=8, target_modules=["q_proj"])
    proc, url = start_server(tiny_model_dir, "--adapters-store", str(store), "--served-model-name", "tiny",
                             "--kv-cache-bytes", str(2**22))  # fmt: skip
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_cli_run_completes_every_request_and_writes_the_report(server, tmp_path):
    out = tmp_path / "report"
    flags = f"--url {server} --num-requests 24 --rate 12 --popularity zipf --max-concurrency 8 --prompt-len 4:24"
    argv = [*flags.split(), "--output-len", "4:12", "--token-ids", "5:250", "--out-dir", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report.keys() >= REPORT_KEYS
    assert (report["completed"], report["failed"], report["num_requests"]) == (24, 0, 24)
    assert report["errors"] == {}
    assert set(report["per_adapter"]) <= {"tiny", "sql", "poet"} and len(report["per_adapter"]) >= 2
    assert sum(a["completed"] for a in report["per_adapter"].values()) == 24
    assert 4 * 24 <= report["total_output_tokens"] <= 12 * 24  # ignore_eos: exactly max_tokens each
    assert report["median_ttft_ms"] > 0 and report["median_itl_ms"] > 0
    for png in ("latency_cdfs.png", "throughput.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")


def test_requests_to_a_dead_server_are_failures_not_gaps(tmp_path: Path):
    url = f"http://127.0.0.1:{_free_port()}"
    workload = Workload(num_requests=5, prompt_len=LengthRange(2, 2), output_len=LengthRange(2, 2))
    report = asyncio.run(run_load(url, workload, models=["tiny"], timeout_s=10))
    assert (report["completed"], report["failed"], report["num_requests"]) == (0, 5, 5)
    assert sum(report["errors"].values()) == 5
    assert all(message.startswith("ConnectError") for message in report["errors"])
