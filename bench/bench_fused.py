"""The fused bf16 CPU kernels against the torch ops they replace, side by side in one process (issue #15).

The default model in bfloat16, loaded twice: with the fused kernels (`server.model.kernels`) and with
`fused_kernels=False`. Each case is timed on both in alternation, 10 rounds after a warm-up, and the ratio is the
median of the per-round ratios (drift on this shared VM cancels within a round). Cases: one decode step of 1, 8 and
32 sequences at contexts 128 and 512 (forward and logits), and one prefill step of 32 prompts of 64 tokens. For the
decode steps, the share of the step spent in `paged_attention` (the decode attention over the paged cache; the K/V
write is not in it) is given for both.

Usage: .venv/bin/python -m bench.bench_fused
"""

from __future__ import annotations

import statistics
import time

import torch

from bench.bench_attention import attention_seconds, timed
from server.engine.batch_builder import build_forward_batch
from server.engine.sequence import SamplingParams, Sequence
from server.model import decoder
from server.model.batch import ForwardBatch
from server.model.default_model import default_model_dir
from server.model.kv_cache import KVCache
from server.model.loader import LoadedModel, load_model
from server.threads import use_engine_threads

BLOCK = 16
ROUNDS = 10


def step_batch(n: int, context: int, new_tokens: int, slots: list[int] | None = None) -> tuple[ForwardBatch, int]:
    """One step of `n` sequences computing their last `new_tokens` of `context` positions; blocks interleaved;
    `slots`: each sequence's adapter slot (none: the base model)."""
    blocks = -(-context // BLOCK)
    seqs = []
    for i in range(n):
        seq = Sequence(str(i), [100 + (7 * i + t) % 1000 for t in range(context)], SamplingParams())
        seq.block_table.extend(i + n * b for b in range(blocks))
        seq.num_computed_tokens = context - new_tokens
        seqs.append(seq)
    return build_forward_batch([(seq, new_tokens) for seq in seqs], BLOCK, torch.device("cpu"), slots), n * blocks


def one_step(loaded: LoadedModel, batch: ForwardBatch, cache: KVCache) -> tuple[float, float]:
    """Seconds of the forward and logits, and of its attention calls."""
    attention_seconds[0] = 0.0
    start = time.perf_counter()
    with torch.inference_mode():
        hidden = loaded.model(batch, cache)
        loaded.model.compute_logits(hidden[batch.logits_indices])
    return time.perf_counter() - start, attention_seconds[0]


def compare(models: dict[str, LoadedModel], batch: ForwardBatch, blocks: int) -> dict[str, list[tuple[float, float]]]:
    cache = KVCache(models["fused"].spec, num_blocks=blocks, block_size=BLOCK, dtype=torch.bfloat16, device="cpu")
    for loaded in models.values():
        one_step(loaded, batch, cache)  # warm-up
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for _ in range(ROUNDS):
        for name, loaded in models.items():
            runs[name].append(one_step(loaded, batch, cache))
    return runs


def main() -> None:
    use_engine_threads()
    path = default_model_dir()
    models = {
        "fused": load_model(path, torch.device("cpu"), torch.bfloat16, fused_kernels=True),
        "torch ops": load_model(path, torch.device("cpu"), torch.bfloat16, fused_kernels=False),
    }
    if not models["fused"].model.fused:
        raise SystemExit("the fused kernels are not available here (see the log line above)")
    decoder.paged_attention = timed(decoder.paged_attention)
    cases = [(f"decode {n} x ctx {c}", n, c, 1) for n in (1, 8, 32) for c in (128, 512)]
    cases.append(("prefill 32 x 64 tokens", 32, 64, 64))
    headers = ("fused ms", "torch ms", "fused/torch", "attn share fused", "attn share torch")
    print(f"{'case':<24}" + "".join(f"{h:>18}" for h in headers))
    for label, n, context, new in cases:
        batch, blocks = step_batch(n, context, new)
        runs = compare(models, batch, blocks)
        ms = {name: 1e3 * statistics.median(s for s, _ in steps) for name, steps in runs.items()}
        ratio = statistics.median(f[0] / t[0] for f, t in zip(runs["fused"], runs["torch ops"], strict=True))
        share = {name: statistics.median(a / s for s, a in steps) for name, steps in runs.items()}
        cells = [f"{ms['fused']:.2f}", f"{ms['torch ops']:.2f}", f"{ratio:.3f}"]
        cells += [f"{share['fused']:.3f}", f"{share['torch ops']:.3f}"] if new == 1 else ["-", "-"]
        print(f"{label:<24}" + "".join(f"{c:>18}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
