"""An adapter's tensors in host memory are views of one memory map, equal to what was loaded cast to the model's
dtype, A and B transposed."""

from __future__ import annotations

import pytest
import torch

from server.adapters.packing import packed
from server.model.lora_weights import LoraWeights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_updates_share_one_storage_and_hold_the_values_cast_to_the_dtype(dtype):
    updates = {
        (0, "q_proj"): LoraWeights(torch.randn(8, 12).bfloat16(), torch.randn(6, 8).bfloat16()),
        (1, "v_proj"): LoraWeights(torch.randn(3, 12), torch.randn(5, 3), torch.rand(5)),
    }
    out = packed(updates, dtype)
    tensors = [t for u in out.values() for t in (u.a, u.b, u.g) if t is not None]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
    assert all(t.data_ptr() % 64 == 0 and t.dtype == dtype for t in tensors)
    for key, update in updates.items():
        cast = update.to(dtype=dtype)
        assert torch.equal(out[key].a, cast.a) and torch.equal(out[key].b, cast.b)
    assert out[(0, "q_proj")].g is None and torch.equal(out[(1, "v_proj")].g, updates[(1, "v_proj")].g.to(dtype))


def test_a_and_b_are_stored_in_the_slot_buffers_layout():
    out = packed({(0, "q_proj"): LoraWeights(torch.randn(8, 12), torch.randn(6, 8))}, torch.bfloat16)
    update = out[(0, "q_proj")]
    assert update.a.shape == (8, 12) and update.a.T.is_contiguous() and not update.a.is_contiguous()
    assert update.b.shape == (6, 8) and update.b.T.is_contiguous() and not update.b.is_contiguous()
