"""Log-probabilities in the two OpenAI shapes: legacy completions (parallel lists) and chat (`content` entries).

Token strings are each token decoded alone, as vLLM reports them; a token that is part of a multi-byte character
decodes to U+FFFD. Log-probabilities below -9999 (a banned or vanishing token) are reported as -9999, as vLLM
does, since JSON has no -infinity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pydantic import BaseModel

from server.engine.logprobs import TokenLogprob

Decode = Callable[[list[int]], list[str]]  # token ids -> each token's text
_FLOOR = -9999.0


class CompletionLogprobs(BaseModel):
    """`logprobs` of a completion choice: one entry per token in each list."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(BaseModel):
    """A candidate token at one position of a chat reply."""

    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    """One token of a chat reply with the most likely alternatives at its position."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """`logprobs` of a chat choice."""

    content: list[ChatTokenLogprob] | None


def _value(logprob: float) -> float:
    return max(logprob, _FLOOR)


def completion_logprobs(
    token_ids: Sequence[int], scored: Sequence[TokenLogprob | None], decode: Decode, text_offset: int
) -> CompletionLogprobs:
    """The legacy shape for `token_ids`; `scored[i]` is None where a token has no score (an echoed first token).

    `top_logprobs` holds the token itself and its alternatives, as vLLM returns them; offsets count characters
    of the returned text from `text_offset` on.
    """
    alternatives = [t for s in scored if s is not None for t, _ in s.top]
    names = decode([*token_ids, *alternatives])
    tokens, alt_names = names[: len(token_ids)], iter(names[len(token_ids) :])
    top: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for token, score in zip(tokens, scored, strict=True):
        offsets.append(text_offset)
        text_offset += len(token)
        if score is None:
            top.append(None)
            continue
        top.append({token: _value(score.logprob)} | {next(alt_names): _value(value) for _, value in score.top})
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[None if s is None else _value(s.logprob) for s in scored],
        top_logprobs=top,
        text_offset=offsets,
    )


def chat_logprobs(scored: Sequence[TokenLogprob], decode: Decode) -> ChatLogprobs:
    """The chat shape for a reply's tokens."""
    names = iter(decode([t for s in scored for t in (s.token_id, *(alt for alt, _ in s.top))]))
    content = []
    for score in scored:
        token = next(names)
        top = [_top(next(names), value) for _, value in score.top]
        content.append(ChatTokenLogprob(**_top(token, score.logprob).model_dump(), top_logprobs=top))
    return ChatLogprobs(content=content)


def _top(token: str, logprob: float) -> TopLogprob:
    return TopLogprob(token=token, logprob=_value(logprob), bytes=list(token.encode("utf-8")))
