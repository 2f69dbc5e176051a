"""The provider-neutral answer of the simulator: deterministic text and token counts.

The answer echoes the last user message word by word (``len-<n>`` cycles its words to n words),
cut to ``max_tokens`` words with finish reason ``length``; thinking (``thoughts-<n>``) comes first
and counts against ``max_tokens`` too. One word is one output token and one streamed chunk.
Input tokens are ``ceil(characters / 4)`` of all input text (at least 1); cache reads and writes
(``cached-<n>``, ``cachew-<n>``) are extra input tokens on top, as if a cached prefix preceded
the prompt. Each dialect reports these counts in its provider's own semantics.
"""

from __future__ import annotations

from dataclasses import dataclass

from vapora.simulator.behaviour import Behaviour

__all__ = ["Reply", "Turn", "make_reply"]


@dataclass(frozen=True, slots=True)
class Turn:
    """What a request asked for, whatever its dialect."""

    model: str
    stream: bool
    input_chars: int
    last_user: str
    max_tokens: int | None = None
    include_usage: bool = False
    endpoint: str = ""
    service_tier: str | None = None  # the tier the request asked for (OpenAI), None: none


@dataclass(frozen=True, slots=True)
class Reply:
    """What the simulator answers: streamed chunks (words) and provider-neutral counts."""

    id: str
    model: str
    chunks: list[str]
    truncated: bool
    prompt_tokens: int
    cache_read: int
    cache_write: int  # all writes, the hour-long ones included
    cache_write_1h: int
    thoughts: int

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @property
    def words(self) -> int:
        return len(self.chunks)


def prompt_tokens(turn: Turn) -> int:
    """The input tokens the simulator counts for ``turn``: a token per four characters."""
    return max(1, -(-turn.input_chars // 4))


def make_reply(turn: Turn, behaviour: Behaviour, reply_id: str) -> Reply:
    """The deterministic answer to ``turn`` under ``behaviour``."""
    words = turn.last_user.split() or ["(empty)"]
    if behaviour.length is not None:
        words = [words[i % len(words)] for i in range(behaviour.length)]
    # Thinking comes first and counts against max_tokens, as the providers count it (OpenAI's
    # reasoning inside max_completion_tokens, Anthropic's thinking inside max_tokens, Gemini's
    # thoughts inside maxOutputTokens): it may leave no room for the answer.
    thoughts = behaviour.thoughts or 0
    truncated = False
    if turn.max_tokens is not None:
        room = max(turn.max_tokens - thoughts, 0)
        thoughts = min(thoughts, turn.max_tokens)
        truncated = len(words) > room
        words = words[:room]
    chunks = [word if i == 0 else " " + word for i, word in enumerate(words)]
    return Reply(
        id=reply_id,
        model=turn.model,
        chunks=chunks,
        truncated=truncated,
        prompt_tokens=prompt_tokens(turn),
        cache_read=behaviour.cache_read or 0,
        cache_write=(behaviour.cache_write or 0) + (behaviour.cache_write_1h or 0),
        cache_write_1h=behaviour.cache_write_1h or 0,
        thoughts=thoughts,
    )
