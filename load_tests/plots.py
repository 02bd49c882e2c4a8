"""PNG plots of a run: latency CDFs per adapter, and throughput over time."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure  # not pyplot: no GUI backend, no global figure state

from load_tests.client import RequestResult
from load_tests.report import latencies

MAX_CURVES = 8  # the most requested adapters get a curve each; "all" covers every request


def plot_latency_cdfs(results: Sequence[RequestResult], path: Path) -> None:
    """TTFT, ITL and end-to-end latency CDFs, overall and for the most requested adapters."""
    groups = {"all": list(results)}
    for model, _ in Counter(r.model for r in results).most_common(MAX_CURVES):
        groups[model] = [r for r in results if r.model == model]
    fig = Figure(figsize=(15, 4.5))
    axes = fig.subplots(1, 3)
    for ax, (kind, title) in zip(axes, (("ttft", "TTFT"), ("itl", "ITL"), ("e2el", "E2E latency")), strict=True):
        for name, group in groups.items():
            values = sorted(s * 1000 for s in latencies(group)[kind])
            if values:
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=name)
        ax.set(title=f"{title} CDF", xlabel="ms", ylabel="fraction of samples", ylim=(0, 1.01))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_throughput(results: Sequence[RequestResult], duration: float, path: Path, bin_s: float = 1.0) -> None:
    """Streamed chunks (about one per token) and requests completed per second, in `bin_s` bins over the run."""
    num_bins = max(1, math.ceil(duration / bin_s))
    edges = [min(i * bin_s, duration) for i in range(num_bins)] + [max(duration, 1e-9)]
    widths = [max(b - a, 1e-9) for a, b in itertools.pairwise(edges)]
    chunks, finished = [0] * num_bins, [0] * num_bins
    for result in results:
        for t in result.chunk_times:
            chunks[min(int(t / bin_s), num_bins - 1)] += 1
        if result.ok and result.latency is not None:
            finished[min(int((result.started + result.latency) / bin_s), num_bins - 1)] += 1
    fig = Figure(figsize=(10, 6))
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.stairs([n / w for n, w in zip(chunks, widths, strict=True)], edges)
    top.set(ylabel="streamed chunks / s", title="Throughput over time")
    bottom.stairs([n / w for n, w in zip(finished, widths, strict=True)], edges, color="tab:green")
    bottom.set(xlabel="seconds since start", ylabel="requests completed / s")
    for ax in (top, bottom):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
