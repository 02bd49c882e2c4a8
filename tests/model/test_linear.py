"""The base GEMM: plain weights for a few rows, oneDNN's packed copy from `PLAIN_MAX_ROWS + 1` rows up."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.model.linear import PLAIN_MAX_ROWS, linear, prepack

packed_available = pytest.mark.skipif(prepack(torch.zeros(8, 8)) is None, reason="oneDNN is not available")


@packed_available
@pytest.mark.parametrize("rows", [1, PLAIN_MAX_ROWS, PLAIN_MAX_ROWS + 1, 32])
def test_each_row_count_takes_the_faster_path_and_both_agree(rows):
    torch.manual_seed(0)
    weight, x = torch.randn(96, 64), torch.randn(rows, 64)
    packed = prepack(weight)
    got = linear(x, weight, packed)
    path = F.linear(x, weight) if rows <= PLAIN_MAX_ROWS else torch.ops.mkldnn._linear_pointwise(
        x, packed, None, "none", [], "")  # fmt: skip
    assert got.equal(path)
    torch.testing.assert_close(got, F.linear(x, weight), atol=1e-5, rtol=1e-5)


def test_weights_without_a_packed_copy_use_the_plain_gemm():
    weight, x = torch.randn(16, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    assert prepack(weight) is None
    assert linear(x, weight, None).equal(F.linear(x, weight))
