"""The fixed set of row counts CPU GEMMs run at."""

from __future__ import annotations

import torch

from server.model.gemm_shapes import EXACT_ROWS, padded_rows, runs_onednn


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
