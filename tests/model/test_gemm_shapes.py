"""The fixed set of row counts CPU GEMMs run at."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.model.gemm_shapes import (
    EXACT_ROWS,
    KERNEL_CACHE_ENTRIES,
    KERNEL_CACHE_VARIABLES,
    bound_kernel_caches,
    padded_rows,
    runs_onednn,
)


def test_packed_gemms_run_at_few_fixed_row_counts_each_at_most_a_sixteenth_larger():
    sizes = [padded_rows(rows) for rows in range(1, 2049)]
    assert sizes[:EXACT_ROWS] == list(range(1, EXACT_ROWS + 1))  # decode batches run as they are
    assert all(rows <= size <= rows + rows / 16 for rows, size in enumerate(sizes, start=1))
    assert sizes == sorted(sizes)
    assert len(set(sizes)) == 128  # oneDNN compiles and keeps one kernel per row count: a fixed set of them
    assert padded_rows(2048) == 2048 and padded_rows(1025) == 1088


def test_only_16_bit_cpu_matmuls_are_padded():
    assert runs_onednn(torch.zeros(2, dtype=torch.bfloat16)) and runs_onednn(torch.zeros(2, dtype=torch.float16))
    assert not runs_onednn(torch.zeros(2)) and not runs_onednn(torch.zeros(2, dtype=torch.float64))
    assert not runs_onednn(torch.zeros(2, dtype=torch.bfloat16, device="meta"))


def test_the_kernel_caches_get_a_bound_unless_the_environment_sets_one(monkeypatch):
    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")
    bound_kernel_caches()
    assert os.environ["LRU_CACHE_CAPACITY"] == str(KERNEL_CACHE_ENTRIES)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "7"  # an operator's choice stands


GROWTH = """
import sys, torch
from server.model.gemm_shapes import bound_kernel_caches
if sys.argv[1] != "default":
    bound_kernel_caches(int(sys.argv[1]))
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
w = torch.randn(256, 64, dtype=torch.bfloat16)
torch.matmul(torch.randn(1, 256, dtype=torch.bfloat16), w)
before = rss()
for rows in range(2, 202):
    torch.matmul(torch.randn(rows, 256, dtype=torch.bfloat16), w)
print(rss() - before)
"""


@pytest.mark.skipif(
    not Path("/proc/self/statm").exists() or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    reason="needs Linux and oneDNN's native bf16 GEMM",
)
def test_bounded_caches_keep_the_memory_of_many_gemm_shapes_small():
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_CACHE_VARIABLES}

    def growth(entries: str) -> int:
        run = subprocess.run([sys.executable, "-c", GROWTH, entries], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return int(run.stdout)

    unbounded, bounded = growth("default"), growth("16")
    assert unbounded > 50 * 2**20  # ~0.5 MB kept per shape: the cost being bounded
    assert bounded < unbounded / 4
