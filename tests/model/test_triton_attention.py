"""The Triton paged decode attention against the torch path (itself tested against SDPA), under Triton's interpreter
on CPU (natively on a GPU): GQA, interleaved blocks, sliding windows, soft-capping, a never-written cache of NaNs."""

from __future__ import annotations

import pytest
import torch

from server.model import backend
from server.model.attention import AttentionOptions, AttentionPlan, paged_attention, write_kv
from server.model.kv_cache import KVCache
from server.model.triton.attention import decode_attention
from tests.model.test_attention import BLOCK, DECODE_ONLY, MIXED, SPEC, _batch, _split

OPTIONS = {
    "plain": AttentionOptions(),
    "window": AttentionOptions(window=5),
    "softcap": AttentionOptions(scale=0.2, softcap=3.0),
    "window-softcap": AttentionOptions(window=3, softcap=2.0),
}


def _step(case, dtype: torch.dtype, device: torch.device):
    """A cache holding every sequence's earlier positions (NaN elsewhere) and this step's q, k, v, written."""
    contexts, query_lens, tables, _ = case
    batch = _batch(contexts, query_lens, tables)
    cache = KVCache(SPEC, num_blocks=13, block_size=BLOCK, dtype=dtype, device=device)
    k_cache, v_cache = cache.layer(0)
    k_cache.fill_(float("nan"))
    v_cache.fill_(float("nan"))
    keys = [torch.randn(c, SPEC.num_kv_heads, SPEC.head_dim, dtype=dtype, device=device) for c in contexts]
    values = [torch.randn(c, SPEC.num_kv_heads, SPEC.head_dim, dtype=dtype, device=device) for c in contexts]
    cached_lens = [c - q for c, q in zip(contexts, query_lens, strict=True)]
    cached = _batch(cached_lens, cached_lens, tables)
    write_kv(k_cache, v_cache, AttentionPlan.build(cached, BLOCK, SPEC), *_split(keys, values, cached_lens)[0])
    k, v = _split(keys, values, cached_lens)[1]
    write_kv(k_cache, v_cache, AttentionPlan.build(batch, BLOCK, SPEC), k, v)
    q = torch.randn(k.shape[0], SPEC.num_heads, SPEC.head_dim, dtype=dtype, device=device)
    return batch, q, k, v, k_cache, v_cache


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("case", [MIXED, DECODE_ONLY], ids=["mixed", "decode-only"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_triton_decode_matches_torch_path(case, options, dtype, tol, monkeypatch: pytest.MonkeyPatch):
    batch, q, k, v, k_cache, v_cache = _step(case, dtype, torch.device("cpu"))
    want = paged_attention(q, k, v, k_cache, v_cache, AttentionPlan.build(batch, BLOCK, SPEC), options)
    monkeypatch.setattr(backend, "triton_kernels", lambda device: True)
    plan = AttentionPlan.build(batch, BLOCK, SPEC)
    assert plan.decode.bags is None  # planned for the kernel: no embedding_bag indices
    got = paged_attention(q, k, v, k_cache, v_cache, plan, options)
    assert got.isfinite().all()
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_triton_decode_with_no_rows_returns_nothing():
    k_cache, v_cache = KVCache(SPEC, 2, BLOCK, torch.float32, torch.device("cpu")).layer(0)
    empty = torch.zeros(0, dtype=torch.int64)
    q = torch.randn(3, SPEC.num_heads, SPEC.head_dim)
    out = decode_attention(q, k_cache, v_cache, empty, empty.view(0, 1), empty, 0.5)
    assert out.shape == (0, SPEC.num_heads, SPEC.head_dim)


@pytest.mark.cuda
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_triton_decode_on_cuda_matches_torch_path(options, monkeypatch: pytest.MonkeyPatch):
    batch, q, k, v, k_cache, v_cache = _step(MIXED, torch.float32, torch.device("cuda"))
    monkeypatch.setattr(backend, "triton_kernels", lambda device: False)
    want = paged_attention(q, k, v, k_cache, v_cache, AttentionPlan.build(batch, BLOCK, SPEC), options)
    monkeypatch.undo()
    got = paged_attention(q, k, v, k_cache, v_cache, AttentionPlan.build(batch, BLOCK, SPEC), options)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
