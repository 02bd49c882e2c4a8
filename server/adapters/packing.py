"""One memory map per adapter in host memory: its tensors packed together, handed back whole when it is evicted.

Left as loaded, an adapter's 240 tensors (9-150 KB each on the default model, q, k, v, o) sit in the malloc heap
between the float32 temporaries of the next loads, and an eviction frees pieces glibc cannot return: cycling 600
adapters three times through a 1 GiB host tier grew the heap by 1.9 GiB, 511-690 MiB of it free yet resident (issue
#28). Packed into an anonymous `mmap` of their own, the tensors leave the heap entirely: the map is unmapped when
the last view of it goes, so an evicted adapter's memory is back with the OS at once, and the heap stays the same
size from one cycle to the next (`server.adapters.heap` trims what the temporaries leave in it).

A and s·B are stored transposed (`a` and `b` are views of `[in, r]` and `[r, out]` memory): the layouts the
device slots hold (`server.model.lora`), so filling a slot on the engine thread copies runs of contiguous rows
instead of transposing, and the transpose is paid here, on the loader thread (`bench/bench_slot_fill.py`: a rank-64
fill on the default model takes 4.7 ms from this layout, 7.6 ms from the layout as read; the load itself takes about
8 ms more, docs/BENCHMARKS.md).
"""

from __future__ import annotations

import mmap
from collections.abc import Mapping
from typing import TypeVar

import torch

from server.model.lora_weights import LoraWeights

K = TypeVar("K")
ALIGN = 64  # bytes: every tensor starts on a cache line, as torch's own allocator places them


def packed(updates: Mapping[K, LoraWeights]) -> dict[K, LoraWeights]:
    """The same updates, every tensor a view of one anonymous memory map, A and B transposed in it (see the module);
    as they are if any is off the CPU."""
    tensors = [t for u in updates.values() for t in (u.a, u.b, u.g) if t is not None]
    if not tensors or any(t.device.type != "cpu" for t in tensors):
        return dict(updates)
    memory = torch.frombuffer(mmap.mmap(-1, sum(map(_span, tensors))), dtype=torch.uint8)  # keeps the map alive
    offset = 0

    def place(t: torch.Tensor) -> torch.Tensor:
        nonlocal offset
        view = memory[offset : offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        view.copy_(t)
        offset += _span(t)
        return view

    return {
        key: LoraWeights(place(u.a.T).T, place(u.b.T).T, None if u.g is None else place(u.g))
        for key, u in updates.items()
    }


def _span(t: torch.Tensor) -> int:
    return -(-t.numel() * t.element_size() // ALIGN) * ALIGN
