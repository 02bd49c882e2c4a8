"""Streaming text out of generated tokens: incremental detokenization and stop-string matching."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

# Prompt tokens decoded in front of the output so the first output token gets its word-boundary space.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text pieces, prefix/read-offset style (vLLM, TGI).

    Each push decodes only a small window: the tokens of the previous piece (`prefix_offset:read_offset`)
    and those after it. The new text is what the window decodes to beyond what the previous piece's
    tokens decode to alone, so spaces a tokenizer adds or strips at the window's start cancel out.
    Text ending in U+FFFD is held back: the last token ends inside a multi-byte character.
    Special tokens (EOS, chat markers) are skipped.

    For byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen2, SmolLM) the pieces concatenate to
    `tokenizer.decode(output_ids, skip_special_tokens=True)`. For SentencePiece tokenizers whose decode
    strips the first token's leading space, the first piece keeps the space the prompt implies.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self._token_ids = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        if self._decode(0, self._read_offset).endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character: the output's first bytes cannot complete it in
            # decode(output_ids), so they must not complete it here either.
            self._prefix_offset = self._read_offset

    def push(self, new_token_ids: Sequence[int]) -> str:
        """Appends tokens; returns the text they complete ("" while a character is still incomplete)."""
        self._token_ids.extend(new_token_ids)
        return self._advance(hold_incomplete=True)

    def flush(self) -> str:
        """Returns the text held back at the end of the stream, replacement characters included."""
        return self._advance(hold_incomplete=False)

    def _advance(self, *, hold_incomplete: bool) -> str:
        if self._read_offset == len(self._token_ids):
            return ""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._token_ids))
        if len(new_text) <= len(prefix_text) or (hold_incomplete and new_text.endswith(_REPLACEMENT_CHAR)):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._token_ids)
        return new_text[len(prefix_text) :]

    def _decode(self, start: int, end: int) -> str:
        if start == end:
            return ""
        return self.tokenizer.decode(self._token_ids[start:end], skip_special_tokens=True)


class StopStringMatcher:
    """Cuts a text stream before the first stop string to appear in it (OpenAI `stop` semantics).

    "First" is the stop string whose first occurrence ends earliest (the one a character-by-character
    stream completes first; on a tie, the longer one), so the result does not depend on how the text
    is split into pieces. A tail that could be the start of a stop string is held back until the
    next piece settles it: stop strings spanning pieces are found and never partly emitted.

    Each stop string is followed by a Knuth-Morris-Pratt automaton, so memory is linear in the stop
    strings' total length and each character of text costs amortised O(number of stop strings).
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.stop = stop
        self.stopped = False
        self._held = ""
        self._automata = [_PrefixAutomaton(s) for s in stop]

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns the text safe to emit and whether a stop string was reached (nothing follows it)."""
        if self.stopped:
            return "", True
        pending = self._held + text
        for i, char in enumerate(text):
            completed = [len(a.pattern) for a in self._automata if a.advance(char)]
            if completed:
                end = len(self._held) + i + 1  # the stop string ends here in `pending`; the longest one wins a tie
                self.stopped, self._held = True, ""
                return pending[: end - max(completed)], True
        held = max((a.matched for a in self._automata), default=0)
        self._held = pending[len(pending) - held :]
        return pending[: len(pending) - held], False

    def flush(self) -> str:
        """Returns the held-back tail at the end of the stream ("" once a stop string was reached)."""
        held, self._held = self._held, ""
        return held


class _PrefixAutomaton:
    """Tracks the longest suffix of the text fed so far that is a prefix of `pattern` (KMP)."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.matched = 0  # characters of `pattern` matched by the end of the text
        self._fallback = _failure_function(pattern)

    def advance(self, char: str) -> bool:
        """Feeds one character; True when the whole pattern ends with it."""
        matched = self.matched
        while matched and self.pattern[matched] != char:
            matched = self._fallback[matched - 1]
        if self.pattern[matched] == char:
            matched += 1
        if matched == len(self.pattern):  # a whole match: keep following, as for overlapping text
            self.matched = self._fallback[matched - 1]
            return True
        self.matched = matched
        return False


def _failure_function(pattern: str) -> list[int]:
    """`fallback[i]`: length of the longest proper prefix of `pattern[: i + 1]` that is also its suffix."""
    fallback = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = fallback[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        fallback[i] = k
    return fallback
