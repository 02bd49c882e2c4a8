"""The base GEMM: oneDNN's packed copy above `PLAIN_MAX_ROWS[dtype]` rows (every row count in bfloat16), else plain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.model.gemm_shapes import padded_rows
from server.model.linear import PLAIN_MAX_ROWS, linear, prepack


def packs(dtype: torch.dtype) -> pytest.MarkDecorator:
    return pytest.mark.skipif(prepack(torch.zeros(8, 8, dtype=dtype)) is None, reason=f"oneDNN does not pack {dtype}")


@pytest.mark.parametrize(
    ("dtype", "rows"),
    [pytest.param(torch.float32, rows, marks=packs(torch.float32)) for rows in (1, 3, 4, 32)]
    + [pytest.param(torch.bfloat16, rows, marks=packs(torch.bfloat16)) for rows in (1, 4, 32)],
)
def test_each_row_count_takes_the_faster_path_and_both_agree(dtype, rows):
    torch.manual_seed(0)
    weight, x = torch.randn(96, 64, dtype=dtype), torch.randn(rows, 64, dtype=dtype)
    packed = prepack(weight)
    got = linear(x, weight, packed)
    plain = rows <= PLAIN_MAX_ROWS[dtype]
    assert plain == (dtype == torch.float32 and rows <= 3)
    path = F.linear(x, weight) if plain else torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    assert got.equal(path)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, F.linear(x, weight), atol=tolerance, rtol=tolerance)


def test_weights_without_a_packed_copy_use_the_plain_gemm():
    weight, x = torch.randn(16, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    assert prepack(weight) is None
    assert linear(x, weight, None).equal(F.linear(x, weight))


@packs(torch.bfloat16)
@pytest.mark.parametrize("rows", [33, 67, 130, 517])
def test_a_padded_gemm_gives_each_row_its_own_result(rows):
    torch.manual_seed(0)
    weight, x = torch.randn(96, 64, dtype=torch.bfloat16), torch.randn(rows, 64, dtype=torch.bfloat16)
    assert padded_rows(rows) > rows
    got = linear(x, weight, prepack(weight))
    assert got.shape == (rows, 96)
    assert got.equal(torch.ops.mkldnn._linear_pointwise(x, prepack(weight), None, "none", [], ""))
    torch.testing.assert_close(got, F.linear(x, weight), atol=2e-2, rtol=2e-2)
