"""One memory map per adapter in host memory: its tensors packed together, handed back whole when it is evicted.

Left as loaded, an adapter's 240 tensors (9-150 KB each on the default model, q, k, v, o) sit in the malloc heap
between the float32 temporaries of the next loads, and an eviction frees pieces glibc cannot return: cycling 600
adapters three times through a 1 GiB host tier grew the heap by 1.9 GiB, 511-690 MiB of it free yet resident (issue
#28). Packed into an anonymous `mmap` of their own, the tensors leave the heap entirely: the map is unmapped when
the last view of it goes, so an evicted adapter's memory is back with the OS at once, and the heap stays the same
size from one cycle to the next (`server.adapters.heap` trims what the temporaries leave in it).

A and s·B are stored transposed (`a` and `b` are views of `[in, r]` and `[r, out]` memory): the layouts the
device slots hold (`server.model.lora`), so filling a slot on the engine thread copies runs of contiguous rows
instead of transposing (`bench/bench_slot_fill.py`: a rank-64 fill on the default model takes 4.7 ms from this
layout, 7.6 ms from the layout as read). The transpose and the cast to the model's dtype are paid here, on the
loader thread, in the one copy each tensor takes into the map, and the map's pages are faulted in by the kernel
in one call rather than one fault per page as the copies first touch them (a rank-64 adapter's 15 MB: 3,600
faults), which had made packing half of a load (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import mmap
from collections.abc import Mapping
from typing import TypeVar

import torch

from server.model.lora_weights import LoraWeights

K = TypeVar("K")
ALIGN = 64  # bytes: every tensor starts on a cache line, as torch's own allocator places them
CPU = torch.device("cpu")
MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE  # pages faulted in by the mmap call itself


def packed(updates: Mapping[K, LoraWeights], dtype: torch.dtype, device: torch.device = CPU) -> dict[K, LoraWeights]:
    """The same updates in `dtype` on `device`: on the CPU every tensor a view of one anonymous memory map, A and B
    transposed in it (see the module); elsewhere only moved and cast."""
    if device.type != "cpu":
        return {key: u.to(dtype=dtype, device=device) for key, u in updates.items()}
    tensors = [t for u in updates.values() for t in (u.a, u.b, u.g) if t is not None]
    if not tensors:
        return dict(updates)
    item = dtype.itemsize
    size = sum(_span(t.numel() * item) for t in tensors)
    memory = torch.frombuffer(mmap.mmap(-1, size, flags=MAP_FLAGS), dtype=torch.uint8)  # keeps the map alive
    offset = 0

    def place(t: torch.Tensor) -> torch.Tensor:
        nonlocal offset
        view = memory[offset : offset + t.numel() * item].view(dtype).view(t.shape)
        view.copy_(t)  # casts
        offset += _span(t.numel() * item)
        return view

    return {
        key: LoraWeights(place(u.a.T).T, place(u.b.T).T, None if u.g is None else place(u.g))
        for key, u in updates.items()
    }


def _span(num_bytes: int) -> int:
    return -(-num_bytes // ALIGN) * ALIGN
