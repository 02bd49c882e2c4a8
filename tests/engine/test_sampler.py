"""Sampler: greedy, filters against Hugging Face's warpers, min_tokens, and batch-invariant seeded sampling."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from server.engine.sampler import (
    INVALID_TOKEN,
    GeneratorFactory,
    Sampler,
    SamplingRow,
    apply_top_k_top_p,
    inverse_cdf,
)
from server.engine.sequence import SamplingParams

EOS = (2, 5)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def row(seed: int | None = 0, num_generated: int = 100, **params) -> SamplingRow:
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return SamplingRow(SamplingParams(**params), generator, num_generated)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax(device: str) -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)).to(device)
    rows = [row(seed=None, temperature=0.0) for _ in range(6)]
    assert Sampler(EOS).sample(logits, rows) == logits.argmax(-1).tolist()


def test_mixed_batch_keeps_greedy_rows_greedy() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    rows = [row(temperature=0.0), row(temperature=1.5, top_k=3), row(temperature=0.0), row(top_p=0.5)]
    tokens = Sampler(EOS).sample(logits, rows)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    assert tokens[1] in logits[1].topk(3).indices.tolist()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_bans_eos_until_reached(device: str, temperature: float) -> None:
    logits = torch.zeros(3, 10, device=device)
    logits[:, EOS[0]] = 50.0  # EOS is by far the most likely token
    logits[:, EOS[1]] = 40.0
    logits[:, 7] = 10.0
    original = logits.clone()
    rows = [row(seed=i, num_generated=n, temperature=temperature, min_tokens=3) for i, n in enumerate([0, 2, 3])]
    tokens = Sampler(EOS).sample(logits, rows)
    assert tokens == [7, 7, EOS[0]]
    assert torch.equal(logits, original)


def test_min_tokens_zero_and_no_eos_ids_leave_logits_alone() -> None:
    logits = torch.full((1, 10), -5.0)
    logits[0, EOS[0]] = 5.0
    assert Sampler(EOS).sample(logits, [row(temperature=0.0)]) == [EOS[0]]
    assert Sampler(()).sample(logits, [row(temperature=0.0, min_tokens=4, num_generated=0)]) == [EOS[0]]


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_top_p_match_hugging_face_warpers(device: str) -> None:
    torch.manual_seed(3)
    logits = torch.randn(6, 200) * 3
    settings = [(0, 1.0), (5, 1.0), (0, 0.9), (20, 0.5), (1, 0.3), (200, 0.01)]
    top_k = torch.tensor([k for k, _ in settings])
    top_p = torch.tensor([p for _, p in settings])
    ours = apply_top_k_top_p(logits.to(device), top_k.to(device), top_p.to(device)).cpu()
    for i, (k, p) in enumerate(settings):
        expected = logits[i : i + 1]
        if k > 0:
            expected = TopKLogitsWarper(k)(None, expected)
        if p < 1.0:
            expected = TopPLogitsWarper(p)(None, expected)
        assert torch.equal(ours[i : i + 1].isinf(), expected.isinf()), settings[i]
        assert torch.equal(ours[i][~ours[i].isinf()], logits[i][~ours[i].isinf()])


def test_top_p_zero_keeps_the_most_likely_token() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    out = apply_top_k_top_p(logits, torch.tensor([0]), torch.tensor([0.0]))
    assert out.isfinite().tolist() == [[False, True, False]]


def test_inverse_cdf_never_picks_zero_probability_tokens() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0]])
    lowest = torch.zeros(3, dtype=torch.float64)
    highest = torch.full((3,), torch.nextafter(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0)).item())
    assert inverse_cdf(probs, lowest).tolist() == [1, 0, 2]
    assert inverse_cdf(probs, highest).tolist() == [2, 2, 2]
    assert inverse_cdf(probs, torch.tensor([0.5, 0.49, 0.3], dtype=torch.float64)).tolist() == [2, 1, 2]


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        ({"temperature": 1.0}, [0, 1, 2, 3, 4]),
        ({"temperature": 2.0, "top_k": 2}, [3, 4]),
        ({"temperature": 1.0, "top_p": 0.8}, [2, 3, 4]),
    ],
)
def test_sampling_frequencies_follow_the_filtered_distribution(params: dict, allowed: list[int]) -> None:
    n = 4000
    logits = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0])
    scaled = logits / params["temperature"]
    probs = torch.full_like(scaled, float("-inf")).index_copy(0, torch.tensor(allowed), scaled[allowed]).softmax(-1)
    rows = [row(seed=i, **params) for i in range(n)]
    tokens = torch.tensor(Sampler(EOS).sample(logits.expand(n, -1), rows))
    freq = torch.bincount(tokens, minlength=5).double() / n
    assert torch.allclose(freq, probs.double(), atol=0.03), (freq, probs)
    assert set(tokens.tolist()) == set(allowed)


def _seeded_logits(step: int, vocab: int) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(1000 + step)) * 2


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_request_gives_same_tokens_whatever_the_batch(device: str) -> None:
    vocab, steps = 300, 40
    target = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=7)
    neighbours = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3),
        SamplingParams(temperature=0.7, top_p=0.5),
        SamplingParams(temperature=1.0, top_k=3),
        SamplingParams(temperature=2.0, top_k=100, top_p=0.3, min_tokens=30),
    ]
    noise = torch.Generator().manual_seed(99)
    sampler = Sampler(EOS)
    streams = []
    for batch_size, position in [(1, 0), (2, 1), (6, 3), (6, 5), (4, 0)]:
        factory = GeneratorFactory(server_seed=batch_size)  # unseeded neighbours differ from run to run
        params = [neighbours[i % len(neighbours)] for i in range(batch_size - 1)]
        params.insert(position, target)
        generators = [factory.create(p.seed) for p in params]
        tokens = []
        for step in range(steps):
            logits = torch.randn(batch_size, vocab, generator=noise) * 3
            logits[position] = _seeded_logits(step, vocab)
            rows = [SamplingRow(p, g, num_generated=step) for p, g in zip(params, generators, strict=True)]
            tokens.append(sampler.sample(logits.to(device), rows)[position])
        streams.append(tokens)
    assert all(stream == streams[0] for stream in streams)
    assert len(set(streams[0])) > 5  # it really sampled


def test_different_seeds_give_different_streams() -> None:
    sampler = Sampler(EOS)
    streams = []
    for seed in (1, 2):
        target = row(seed=seed, temperature=1.0)
        streams.append([sampler.sample(_seeded_logits(step, 300)[None], [target])[0] for step in range(20)])
    assert streams[0] != streams[1]


def test_generator_factory_is_reproducible_per_server_seed() -> None:
    def draws(factory: GeneratorFactory, seed: int | None) -> list[float]:
        return torch.rand(4, generator=factory.create(seed)).tolist()

    first, second, other = GeneratorFactory(123), GeneratorFactory(123), GeneratorFactory(124)
    assert [draws(first, None) for _ in range(3)] == [draws(second, None) for _ in range(3)]
    assert draws(first, None) != draws(first, None)
    assert draws(GeneratorFactory(123), None) != draws(other, None)
    assert draws(first, 5) == draws(other, 5) == torch.rand(4, generator=torch.Generator().manual_seed(5)).tolist()
    assert first.create(None).device.type == "cpu"


def test_invalid_calls_raise() -> None:
    with pytest.raises(ValueError, match="rows"):
        Sampler(EOS).sample(torch.zeros(2, 10), [row()])


def _mixed_rows(seed: int = 0) -> list[SamplingRow]:
    return [
        row(seed=seed + i, temperature=t, top_k=k) for i, (t, k) in enumerate([(0.0, 0), (1.0, 5), (0.7, 0), (1.2, 0)])
    ]


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("bad", [0, 1])
def test_a_row_of_non_finite_logits_fails_alone(poison: float, bad: int) -> None:
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(4))
    clean = Sampler(EOS).sample(logits, _mixed_rows())
    poisoned = logits.clone()
    poisoned[bad, 7] = poison
    tokens = Sampler(EOS).sample(poisoned, _mixed_rows())
    assert tokens[bad] == INVALID_TOKEN
    assert [t for i, t in enumerate(tokens) if i != bad] == [t for i, t in enumerate(clean) if i != bad]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_with_no_finite_logit_or_overflowing_temperature_fail(temperature: float) -> None:
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(5))
    logits[0] = float("-inf")
    rows = [row(temperature=temperature), row(temperature=temperature), row(temperature=temperature)]
    tokens = Sampler(EOS).sample(logits, rows)
    assert tokens[0] == INVALID_TOKEN and all(0 <= t < 30 for t in tokens[1:])
    hot = torch.full((1, 30), 1e30)
    hot[0, 3] = 3e38  # / 1e-10 overflows to +inf: NaN probabilities, which must never index the vocabulary
    assert Sampler(EOS).sample(hot, [row(temperature=1e-10)]) == [INVALID_TOKEN]


@pytest.mark.parametrize("generator", [None, "not a generator"])
def test_a_failing_generator_fails_its_row_alone_and_costs_no_other_row_a_draw(generator) -> None:
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(6))
    clean = Sampler(EOS).sample(logits, _mixed_rows(seed=10))
    rows = _mixed_rows(seed=10)
    rows[2] = SamplingRow(rows[2].params, generator, 0, request_id="broken")
    tokens = Sampler(EOS).sample(logits, rows)
    assert tokens[2] == INVALID_TOKEN
    assert [tokens[i] for i in (0, 1, 3)] == [clean[i] for i in (0, 1, 3)]
