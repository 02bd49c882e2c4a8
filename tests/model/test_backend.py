"""One place picks the kernels: torch ops for the exact mode on CPU, Triton on CUDA, torch ops elsewhere."""

from __future__ import annotations

import torch

from server.model import backend
from server.model.backend import Impl, Kernels, pick_kernels


def test_float32_on_cpu_runs_torch_ops():
    assert pick_kernels(torch.float32, torch.device("cpu")) == Kernels(Impl.TORCH, Impl.TORCH, Impl.TORCH)
    assert not backend.triton_kernels(torch.device("cpu"))


def test_cuda_runs_triton_for_adapters_and_decode_and_torch_ops_for_the_rest():
    kernels = pick_kernels(torch.bfloat16, torch.device("cuda"))  # no GPU needed to decide
    assert kernels == Kernels(Impl.TORCH, Impl.TRITON, Impl.TRITON)
    assert not kernels.fused_cpu


def test_cuda_without_triton_runs_torch_ops(monkeypatch):
    monkeypatch.setattr(backend, "_triton_missing", lambda: "no module named triton")
    assert pick_kernels(torch.float32, torch.device("cuda")) == Kernels(Impl.TORCH, Impl.TORCH, Impl.TORCH)


def test_bfloat16_on_cpu_without_fused_kernels_runs_torch_ops():
    kernels = pick_kernels(torch.bfloat16, torch.device("cpu"), fused=False)
    assert kernels == Kernels(Impl.TORCH, Impl.TORCH, Impl.TORCH)
