"""Draft-model speculation: a smaller model proposes greedily over its own KV cache; exact against plain decoding."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server import cli
from server.engine.factory import build_core
from server.engine.sequence import FinishReason, SamplingParams, Sequence
from server.engine.speculative.config import SpeculativeConfig, parse_speculative_config
from server.engine.speculative.draft import DraftProposer
from server.engine.speculative.draft_adapters import DraftAdapters
from server.engine.speculative.policy import SpeculationPolicy
from server.errors import ConfigurationError
from server.metrics import Metrics
from server.model.loader import load_model
from server.model.routing import BASE_SLOT
from server.settings import Settings
from tests.engine.test_speculative import GREEDY, JOBS, LOOP, _core, _run
from tests.helpers import make_adapter_store, make_peft_adapter

CPU = torch.device("cpu")
NAMES = ("base", "lora", "wide", "dora")


def _config(model: Path, k: int = 4) -> str:
    return json.dumps({"method": "draft_model", "num_speculative_tokens": k, "model": str(model)})


@pytest.fixture(scope="module")
def adapter_store(tiny_model_dir, tmp_path_factory) -> Path:
    """The target's adapters, as test_speculative's: LoRA on q,v; LoRA on every linear; DoRA."""
    return make_adapter_store(tiny_model_dir, tmp_path_factory.mktemp("target-store"), {
        "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "wide": dict(r=8, lora_alpha=16, target_modules="all-linear"),
        "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "o_proj"]),
    })  # fmt: skip


@pytest.fixture(scope="module")
def draft_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A layer-skip draft: the tiny model's first layer alone, with its embeddings, norm and head. Smaller, the same
    tokenizer, and agreeing with the target often but not always."""
    draft = _copy_with(tiny_model_dir, tmp_path_factory.mktemp("draft") / "m", num_hidden_layers=1)
    weights = load_file(draft / "model.safetensors")
    save_file(
        {k: t for k, t in weights.items() if ".layers.1." not in k}, draft / "model.safetensors", {"format": "pt"}
    )
    return draft


@pytest.fixture(scope="module")
def draft_store(draft_dir, tmp_path_factory) -> Path:
    """Draft adapters: `lora` (named as a target adapter) and `unused` (no target adapter has its name)."""
    root = tmp_path_factory.mktemp("draft-adapter_store")
    make_peft_adapter(draft_dir, root / "lora", seed=11, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    make_peft_adapter(draft_dir, root / "unused", seed=12, r=2, lora_alpha=4, target_modules=["o_proj"])
    return root


def _proposer(model_dir: Path, chunk: int = 64, adapters: Path | None = None) -> DraftProposer:
    loaded = load_model(model_dir, CPU, torch.float32)
    return DraftProposer(loaded, DraftAdapters.load(adapters, loaded.model, 64), 64, 4, chunk)


def _counts(core) -> tuple[int, int]:
    spec = core.speculator
    return sum(spec.proposed.values()), sum(spec.accepted.values())


def _finish(*gens) -> None:
    for gen in gens:
        next(gen, None)


def test_config_names_the_draft_folder_and_the_flag_reaches_the_settings(tmp_path) -> None:
    assert parse_speculative_config(_config(tmp_path, 3)) == SpeculativeConfig(
        3, method="draft_model", model=str(tmp_path)
    )
    with pytest.raises(ConfigurationError, match="needs model"):
        parse_speculative_config('{"method": "draft_model", "num_speculative_tokens": 3}')
    parser = cli.build_parser()
    args = parser.parse_args(["serve", "--speculative-config", _config(tmp_path), "--draft-adapters-store", "x"])
    assert cli.settings_from_args(args, parser).draft_adapters_store == Path("x")
    assert Settings().draft_adapters_store is None


def test_rolled_back_proposals_give_what_a_fresh_draft_proposes(tiny_model_dir) -> None:
    """The KV bookkeeping: after kept and rejected proposals, after steps without proposing and across chunked
    catch-ups, a long-lived draft proposes exactly what a draft that reads the row from scratch does."""
    kept = _proposer(tiny_model_dir, chunk=16)
    seq = Sequence("r", LOOP * 3, GREEDY)  # 39 tokens: three catch-up chunks of 16
    assert kept.propose([(seq, 4)]) == [[]] and kept.propose([(seq, 4)]) == [[]]
    (first,) = kept.propose([(seq, 4)])
    assert len(first) == 4
    for appended in ([first[0], first[1], 250], [7] * 7, []):  # kept two; steps without proposals; no change
        seq.output_token_ids.extend(appended)
        (got,) = kept.propose([(seq, 3)])
        fresh = _proposer(tiny_model_dir, chunk=1000)
        assert got == fresh.propose([(Sequence("r", seq.token_ids, GREEDY), 3)])[0]
        assert kept.rows["r"].seq.num_computed_tokens == len(seq) + 2  # its proposals but the last
    kept.finish(seq, FinishReason.STOP)
    assert kept.blocks.num_free_blocks == kept.blocks.num_blocks and not kept.rows


def test_the_target_as_its_own_draft_has_every_greedy_proposal_accepted(tiny_model_dir, adapter_store) -> None:
    """Same weights, and with the target's adapters as draft adapters: every proposal of greedy rows is the target's
    own argmax, so all of them stand, base and adapter rows alike."""
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)  # no token the target bans or penalises
    jobs = [(name, LOOP[i:], params, None if name == "base" else name) for i, name in enumerate(NAMES)]
    plain = _core(tiny_model_dir, adapter_store, None)
    spec = _core(tiny_model_dir, adapter_store, _config(tiny_model_dir), draft_adapters_store=adapter_store)
    core, registry = next(spec)
    assert _run(core, registry, jobs) == _run(*next(plain), jobs)
    proposed, accepted = _counts(core)
    assert proposed >= 12 and accepted >= 0.95 * proposed, (proposed, accepted)
    assert {"lora", "dora", "wide"} <= {key.split("@")[0] for key in core.speculator.proposed if key}
    _finish(plain, spec)


@pytest.mark.parametrize("merged", [[], ["wide"]])
def test_mixed_adapter_batches_give_the_tokens_of_plain_decoding(
    tiny_model_dir, adapter_store, draft_dir, merged
) -> None:
    plain = _core(tiny_model_dir, adapter_store, None, merged=merged)
    spec = _core(tiny_model_dir, adapter_store, _config(draft_dir), merged=merged)
    core, registry = next(spec)
    assert _run(core, registry, JOBS) == _run(*next(plain), JOBS)
    proposed, accepted = _counts(core)
    assert proposed > 0 and 0 < accepted < proposed
    proposer = core.speculator.proposer
    assert proposer.blocks.num_free_blocks == proposer.blocks.num_blocks and not proposer.rows
    _finish(plain, spec)


def test_draft_adapters_serve_the_rows_of_their_name_and_keep_outputs_exact(
    tiny_model_dir, adapter_store, draft_dir, draft_store
) -> None:
    with_adapters, plain_draft = _proposer(draft_dir, adapters=draft_store), _proposer(draft_dir)
    assert set(with_adapters.adapters.slots) == {"lora", "unused"}
    assert with_adapters.adapters.slot_of("lora@3") >= 0 and with_adapters.adapters.slot_of(None) == BASE_SLOT

    def proposals(proposer: DraftProposer) -> list[list[int]]:
        rows = [
            (Sequence(f"r{i}", LOOP[i:], GREEDY, adapter), 6) for i, adapter in enumerate(["lora@3", "dora@1", None])
        ]
        return proposer.propose(rows)

    lora, dora, base = proposals(with_adapters)
    assert lora != proposals(plain_draft)[0] and [dora, base] == proposals(plain_draft)[1:]
    jobs = [("lora", LOOP, GREEDY, "lora"), ("dora", LOOP[1:], GREEDY, "dora"), ("base", LOOP[2:], GREEDY, None)]
    plain = _core(tiny_model_dir, adapter_store, None)
    spec = _core(tiny_model_dir, adapter_store, _config(draft_dir), draft_adapters_store=draft_store)
    core, registry = next(spec)
    assert _run(core, registry, jobs) == _run(*next(plain), jobs)
    assert all(core.speculator.proposed.values()) and len(core.speculator.proposed) == 3
    _finish(plain, spec)


def test_seeded_sampled_requests_get_the_tokens_of_plain_decoding(tiny_model_dir, adapter_store, draft_dir) -> None:
    jobs = [
        ("low", LOOP, SamplingParams(max_tokens=30, temperature=0.05, seed=5), "lora"),
        ("high", LOOP[1:], SamplingParams(max_tokens=30, temperature=1.0, seed=9), None),
        ("topk", LOOP[2:], SamplingParams(max_tokens=20, temperature=0.8, top_k=30, seed=7), "dora"),
    ]
    plain = _core(tiny_model_dir, adapter_store, None)
    spec = _core(tiny_model_dir, adapter_store, _config(tiny_model_dir), draft_adapters_store=adapter_store)
    core, registry = next(spec)
    assert _run(core, registry, jobs) == _run(*next(plain), jobs)
    assert _counts(core)[1] > 0
    _finish(plain, spec)


def test_sampling_with_draft_proposals_keeps_the_target_distribution(
    tiny_model_dir, adapter_store, draft_dir, monkeypatch
) -> None:
    """Two-sample test: the second token of unseeded requests, plain vs the draft proposing it, other server seeds.
    Every step proposes (the cost policy, not under test, would stop a draft this slow on a CPU)."""
    monkeypatch.setattr(SpeculationPolicy, "speculate", lambda self, num_rows: True)
    params = SamplingParams(max_tokens=3, temperature=0.1, ignore_eos=True)  # room for one proposal at token 2
    jobs = [(f"r{i}", LOOP, params, None) for i in range(400)]

    def second_tokens(speculative: str | None, seed: int) -> tuple[list[int], tuple[int, int]]:
        gen = _core(tiny_model_dir, adapter_store, speculative, seed=seed, max_num_seqs=256)
        core, registry = next(gen)
        got = _run(core, registry, jobs)
        counts = (0, 0) if speculative is None else _counts(core)
        _finish(gen)
        return [got[rid][0][1] for rid, *_ in jobs], counts

    plain, _ = second_tokens(None, 1)
    spec, (proposed, accepted) = second_tokens(_config(draft_dir), 2)
    bins = [token for token, _ in Counter(plain).most_common(4)]
    observed = torch.tensor([[sum(t == b for t in sample) for b in bins] + [sum(t not in bins for t in sample)]
                             for sample in (plain, spec)], dtype=torch.float64)  # fmt: skip
    expected = observed.sum(0, keepdim=True) * observed.sum(1, keepdim=True) / observed.sum()
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 18.5  # 4 degrees of freedom, p = 0.001
    assert 0 < accepted < proposed  # proposals were kept and refused


def test_aborted_failed_and_finished_requests_free_every_draft_block(
    tiny_model_dir, adapter_store, draft_dir, monkeypatch
) -> None:
    monkeypatch.setattr(SpeculationPolicy, "speculate", lambda self, num_rows: True)
    gen = _core(tiny_model_dir, adapter_store, _config(draft_dir))
    core, _ = next(gen)
    proposer = core.speculator.proposer
    for rid in ("a", "b", "c"):
        core.add_request(rid, LOOP, GREEDY, None)
    core.add_request("done", LOOP, SamplingParams(max_tokens=3, temperature=0.0), None)
    for _ in range(4):
        core.step()
    assert proposer.rows.keys() == {"a", "b", "c"} and proposer.blocks.num_used_blocks > 0  # "done" finished
    used = proposer.blocks.num_used_blocks
    core.abort("a")
    assert proposer.rows.keys() == {"b", "c"} and proposer.blocks.num_used_blocks < used
    core.fail_all("test")
    assert not proposer.rows and proposer.blocks.num_free_blocks == proposer.blocks.num_blocks
    _finish(gen)


def test_a_full_draft_cache_proposes_nothing_for_the_rows_it_cannot_hold(
    tiny_model_dir, adapter_store, draft_dir
) -> None:
    jobs = [
        ("long", LOOP * 3, GREEDY, "lora"),
        ("short", LOOP[:5], SamplingParams(max_tokens=10, temperature=0.0), None),
    ]
    plain = _core(tiny_model_dir, adapter_store, None)
    spec = _core(tiny_model_dir, adapter_store, _config(draft_dir))
    core, registry = next(spec)
    loaded = core.speculator.proposer.loaded
    core.speculator.proposer = DraftProposer(loaded, DraftAdapters({}), num_blocks=6, block_size=4, chunk_tokens=64)
    assert _run(core, registry, jobs) == _run(*next(plain), jobs)  # 39 prompt tokens never fit in 24
    lora = sum(n for key, n in core.speculator.proposed.items() if key and key.startswith("lora"))
    assert lora == 0 and core.speculator.proposed[None] > 0
    _finish(plain, spec)


def test_a_failing_draft_proposes_nothing_and_fails_no_request(
    tiny_model_dir, adapter_store, draft_dir, monkeypatch
) -> None:
    plain = _core(tiny_model_dir, adapter_store, None)
    spec = _core(tiny_model_dir, adapter_store, _config(draft_dir))
    core, registry = next(spec)
    forward, calls = DraftProposer._forward, []

    def fail_twice(self, work):
        calls.append(1)
        if len(calls) in (2, 5):
            raise RuntimeError("draft fell over")
        return forward(self, work)

    monkeypatch.setattr(DraftProposer, "_forward", fail_twice)
    jobs = [("a", LOOP, GREEDY, "lora"), ("b", LOOP[1:], GREEDY, None)]
    assert _run(core, registry, jobs) == _run(*next(plain), jobs)
    assert len(calls) > 5 and _counts(core)[0] > 0
    _finish(plain, spec)


def _copy_with(src: Path, dst: Path, **config) -> Path:
    shutil.copytree(src, dst)
    path = dst / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return dst


def _other_tokenizer(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    path = dst / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two byte tokens swapped
    path.write_text(json.dumps(tokenizer))
    return dst


def test_start_refuses_a_draft_that_cannot_serve_as_one(tiny_model_dir, adapter_store, draft_dir, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    for folder, words in [
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "empty", "cannot be served.*no config.json"),
        (_copy_with(draft_dir, tmp_path / "vocab", vocab_size=300), "vocabulary of 300 tokens"),
        (_copy_with(tiny_model_dir, tmp_path / "large", num_hidden_layers=3), "larger than the target"),
        (_other_tokenizer(draft_dir, tmp_path / "tokenizer"), "different tokenizer"),
    ]:
        settings = Settings(model=tiny_model_dir, adapters_store=adapter_store, kv_cache_bytes=2**20, block_size=4,
                            speculative_config=_config(folder))  # fmt: skip
        with pytest.raises(ConfigurationError, match=words) as refused:
            build_core(settings, Metrics(10, 4))
        assert refused.value.param == "speculative_config"


def test_start_refuses_draft_adapters_that_do_not_fit_the_draft(
    tiny_model_dir, adapter_store, draft_dir, tmp_path
) -> None:
    bad = tmp_path / "bad"
    make_peft_adapter(tiny_model_dir, bad / "lora", r=4, lora_alpha=8, target_modules=["q_proj"])  # 2 layers, not 1
    for root, words in [(tmp_path / "nowhere", "is not a folder"), (bad, "draft adapter 'lora' does not fit")]:
        settings = Settings(model=tiny_model_dir, adapters_store=adapter_store, kv_cache_bytes=2**20, block_size=4,
                            speculative_config=_config(draft_dir), draft_adapters_store=root)  # fmt: skip
        with pytest.raises(ConfigurationError, match=words) as refused:
            build_core(settings, Metrics(10, 4))
        assert refused.value.param == "draft_adapters_store"
