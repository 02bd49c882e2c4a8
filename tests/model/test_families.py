"""Every served family against transformers: logits of prefill, chunked prefill and decode steps in float32.

Prompts run past each sliding window and each rotary type's original context, so windows, soft-caps, q/k norms,
rotary scaling, partial rotary and Gemma's norms are all on the path.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engine.batch_builder import build_forward_batch
from server.engine.sequence import SamplingParams, Sequence
from server.model.architecture import UnsupportedModelError
from server.model.kv_cache import KVCache
from server.model.loader import load_model
from tests.families import FAMILIES, lockstep_logits, make_family_checkpoint, near_tie_margins

BLOCK = 4


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
    return make_family_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


def _allocate(seqs: list[Sequence], total: int) -> None:
    """Give each sequence enough blocks for `total` tokens, interleaving ids so tables are not contiguous."""
    next_block = 0
    for _ in range(-(-total // BLOCK)):
        for seq in seqs:
            seq.block_table.append(next_block)
            next_block += 1


@pytest.mark.parametrize("chunk", [None, 5])
def test_prefill_chunks_and_decode_match_transformers(family_dir, chunk):
    loaded = load_model(family_dir, torch.device("cpu"), torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(family_dir, dtype=torch.float32).eval()
    prompts = [list(range(3, 40)), [17], [5, 9, 22, 41, 7, 3, 99, 12, 13, 200, 31]]
    seqs = [Sequence(str(i), p, SamplingParams()) for i, p in enumerate(prompts)]
    _allocate(seqs, 64)
    cache = KVCache(loaded.spec, num_blocks=len(seqs) * 16, block_size=BLOCK, dtype=torch.float32, device="cpu")
    for _step in range(14):
        work = [(s, min(s.num_uncomputed_tokens, chunk or 10**9)) for s in seqs]
        batch = build_forward_batch(work, BLOCK, torch.device("cpu"))
        with torch.no_grad():
            logits = loaded.model.compute_logits(loaded.model(batch, cache)[batch.logits_indices])
        sampled = [s for s, n in work if s.num_computed_tokens + n == len(s)]
        for s, n in work:
            s.num_computed_tokens += n
        for row, s in zip(logits, sampled, strict=True):
            with torch.no_grad():
                want = reference(torch.tensor([s.token_ids])).logits[0, -1]
            torch.testing.assert_close(row, want, atol=1e-4, rtol=1e-4)
            s.output_token_ids.append(int(want.argmax()))


def test_the_spec_is_read_from_each_config(family_dir):
    spec = load_model(family_dir, torch.device("cpu"), torch.float32).spec
    config = json.loads((family_dir / "config.json").read_text())
    assert spec.model_type == config["model_type"]
    assert len(spec.layer_windows) == len(spec.layer_rope) == spec.num_layers
    if config.get("sliding_window"):
        assert config["sliding_window"] in spec.layer_windows
    else:
        assert set(spec.layer_windows) == {None}


def test_an_unknown_model_type_names_the_supported_ones(tiny_model_dir, tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text()) | {"model_type": "gpt2"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"model_type 'gpt2' is not supported; supported: .*'qwen3'"):
        load_model(folder, torch.device("cpu"), torch.float32)


def test_a_sharded_checkpoint_loads_as_the_whole_one(tmp_path):
    whole = make_family_checkpoint(tmp_path / "whole", "qwen3")
    reference = AutoModelForCausalLM.from_pretrained(whole, dtype=torch.float32)
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "sharded" / name).write_bytes((whole / name).read_bytes())
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    loaded = [load_model(path, torch.device("cpu"), torch.float32).model for path in (whole, tmp_path / "sharded")]
    for a, b in zip(*(m.state_dict().values() for m in loaded), strict=True):
        assert a.equal(b)


def test_bf16_differs_from_float32_only_at_near_ties(family_dir, record_property):
    """bf16 (the fused kernels where the family allows) against the exact mode, step by step: logits within bf16
    rounding, and a different greedy token only where float32 itself has a near-tie (reported)."""
    exact, half = (load_model(family_dir, torch.device("cpu"), dtype) for dtype in (torch.float32, torch.bfloat16))
    prompts = [list(range(3, 40)), [17, 4, 99], list(range(50, 61))]
    ties = []
    for want, got in lockstep_logits([exact, half], prompts, 12):
        torch.testing.assert_close(got, want, atol=0.15, rtol=0.05)
        ties += near_tie_margins(want, got).tolist()
    assert all(margin <= 0.02 for margin in ties), ties
    record_property("bf16_near_ties", ties)
