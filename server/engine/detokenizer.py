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
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.stop = stop
        self.stopped = False
        self._held = ""
        # Proper prefixes of the stop strings: the only tails worth holding back.
        self._prefixes = {s[:n] for s in stop for n in range(1, len(s))}
        self._max_held = max((len(s) - 1 for s in stop), default=0)

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns the text safe to emit and whether a stop string was reached (nothing follows it)."""
        if self.stopped:
            return "", True
        text = self._held + text
        matches = [(start + len(s), start) for s in self.stop if (start := text.find(s)) >= 0]
        if matches:
            self.stopped, self._held = True, ""
            return text[: min(matches)[1]], True
        held = self._held_length(text)
        self._held = text[len(text) - held :]
        return text[: len(text) - held], False

    def flush(self) -> str:
        """Returns the held-back tail at the end of the stream ("" once a stop string was reached)."""
        held, self._held = self._held, ""
        return held

    def _held_length(self, text: str) -> int:
        for n in range(min(len(text), self._max_held), 0, -1):
            if text[-n:] in self._prefixes:
                return n
        return 0
