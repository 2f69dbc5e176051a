"""The values a provider call takes and gives: request, completion, partial state, estimates.

Requests always send an output limit: ``max_tokens`` or :data:`DEFAULT_MAX_TOKENS` (4096, the
guide's Claude default), so that ``ProviderClient.estimate_cost`` is a true upper bound.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import msgspec

from events.contract import (
    ChatMessage,
    Price,
    ProviderCall,
    ProviderCallResult,
    Usage,
)
from vapora.errors import InvalidRequest, ProviderError, ProviderStreamBroken, ProviderTimeout
from vapora.pricing import TEMPLATE_ALLOWANCE

_log = logging.getLogger("vapora.providers")

#: Past this a reported count is not a count of anything (2**53: a float still holds it exactly).
MAX_TOKEN_COUNT = 2**53


def _token_count(value: int | None) -> bool:
    return value is None or (type(value) is int and 0 <= value <= MAX_TOKEN_COUNT)


def count_sum(*parts: Any) -> int | None:
    """The sum of reported token counts (a missing part counts 0); None, so that the total is
    estimated like a missing one, when every part is missing or a part is not a count (not an
    integer, negative, past :data:`MAX_TOKEN_COUNT`): checked part by part, since a negative
    part could hide in a plausible sum."""
    total, reported = 0, False
    for part in parts:
        if part is None:
            continue
        reported = True
        value = part
        # Only an integer is a count: a fraction, a string, a boolean (``true`` is no token) is
        # not, and is not rounded into one.
        if type(value) is not int or not 0 <= value <= MAX_TOKEN_COUNT:
            _log.warning("the provider reported a token count that is not one (%.24s)", part)
            return None
        total += value
    # None when not reported: estimated (a count of 0 would bill nothing for the text).
    return total if reported else None


__all__ = [
    "DEFAULT_MAX_TOKENS",
    "INPUT_TEMPLATE_ALLOWANCE",
    "REASONING_ALLOWANCE",
    "count_sum",
    "Completion",
    "ProviderRequest",
    "StreamBroken",
    "Turn",
    "input_token_bound",
    "may_reason",
    "output_ceiling",
    "sent_timeout",
    "upper_bound_usage",
]

DEFAULT_MAX_TOKENS = 4096
#: Input tokens a model's chat template may add past :func:`input_token_bound` (a local model's
#: default system prompt, a date header: tens to hundreds of tokens): a count past the bound and
#: this is not one (:meth:`Turn.usage`); the reservation's tiers reach as far.
INPUT_TEMPLATE_ALLOWANCE = TEMPLATE_ALLOWANCE
#: Output tokens a reasoning model's provider may bill past the output limit it was sent, for
#: the models that do so (:func:`output_ceiling`: DeepSeek's reasoner bounds only the answer by
#: ``max_tokens``; its reasoning runs to 32K). Every other provider counts reasoning and thinking
#: inside the limit (OpenAI's ``max_completion_tokens``, Gemini's ``maxOutputTokens``,
#: Anthropic's ``max_tokens``).
REASONING_ALLOWANCE = 32_768
_REASONING_PAST_LIMIT = re.compile(r"(?:^|/)deepseek-reasoner\b", re.IGNORECASE)
_MESSAGE_OVERHEAD = 4
#: Tokens a chat API adds to prime the reply (OpenAI's ``<|start|>assistant<|message|>``: 3).
_REPLY_OVERHEAD = 8


def _extra_bytes(text: str) -> int:
    return 0 if text.isascii() else len(text.encode("utf-8", "surrogatepass")) - len(text)


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """One call's input: exactly one of ``prompt`` or ``messages``, and the usual options.

    ``model`` overrides the client's configured model for this call; ``price`` the client's
    price (the price in force at the call's time, worked out by its caller: a client serves
    many calls at once, so it is the call's, not a client's attribute to change).
    """

    prompt: str | None = None
    messages: Sequence[ChatMessage] | None = None
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    model: str | None = None
    price: Price | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequest("exactly one of `prompt` or `messages` is required")
        if self.messages is not None and not self.messages:
            raise InvalidRequest("`messages` must not be empty")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequest("`max_tokens` must be at least 1")

    @classmethod
    def from_call(cls, call: ProviderCall, price: Price | None = None) -> ProviderRequest:
        """The request of a router -> provider-actor call (``price``: see the class doc)."""
        return cls(
            prompt=call.prompt,
            messages=call.messages,
            system=call.system,
            max_tokens=call.max_tokens,
            temperature=call.temperature,
            model=call.model or None,
            price=price,
        )

    @property
    def output_limit(self) -> int:
        """The output-token limit sent to the provider."""
        return self.max_tokens or DEFAULT_MAX_TOKENS

    def turns(self) -> list[tuple[str, str]]:
        """The conversation as ``(role, content)`` (a prompt is one user turn)."""
        if self.messages is None:
            return [("user", self.prompt or "")]
        return [(m.role, m.content) for m in self.messages]

    def system_text(self) -> str | None:
        """``system`` and any system-role messages joined, for APIs with a separate system field."""
        parts = [self.system] if self.system else []
        parts += [content for role, content in self.turns() if role == "system"]
        return "\n\n".join(parts) if parts else None

    def system_and_turns(self) -> tuple[str | None, list[tuple[str, str]]]:
        """For APIs with a separate system field (Anthropic's ``system``, Gemini's
        ``systemInstruction``): :meth:`system_text` and the other turns. A conversation of
        system messages only (which OpenAI and Ollama answer) is sent as one user turn of that
        text and no system field: those APIs refuse a conversation with no turn (HTTP 400,
        "at least one message is required", "contents is not specified")."""
        system = self.system_text()
        turns = [(role, content) for role, content in self.turns() if role != "system"]
        if not turns and system is not None:
            return None, [("user", system)]
        return system, turns

    def input_chars(self) -> int:
        return len(self.system or "") + sum(len(content) for _, content in self.turns())

    def input_extra_bytes(self) -> int:
        """UTF-8 bytes past the first of each non-ASCII character of the input."""
        texts = [content for _, content in self.turns()]
        if self.system:
            texts.append(self.system)
        return sum(_extra_bytes(text) for text in texts)


#: Models that reason (or think) before they answer by default, their reasoning billed as output
#: and not streamed as text: OpenAI's o-series, GPT-5 (not its ``-chat`` model) and codex
#: models; xAI's Grok 4, Grok 3 mini and Grok Code; Gemini 2.5 and later, and the ``-latest``
#: aliases of Gemini's current models; open-weight reasoners served behind an
#: OpenAI-compatible or Ollama endpoint (gpt-oss, DeepSeek-R1, QwQ, Qwen3 but its ``instruct``
#: and ``coder`` models, Magistral, GLM 4.5 and later, anything named for reasoning or
#: thinking). Matched in a model name's words (after a ``/``, ``:``, ``-``, ``_`` or ``.``, or
#: at its start), case-insensitively. An OpenAI-compatible stream that carries reasoning text
#: (``reasoning_content``, ``reasoning``) says so whatever the name.
_REASONING = re.compile(
    r"(?:^|[/:_.-])(?:o\d|gpt-5(?![\w.-]*chat)|gpt-oss|codex|grok-4|grok-3-mini|grok-code|r1\b|qwq"
    r"|qwen3(?![\w.:-]*(?:instruct|coder))|magistral|glm-(?:4\.[5-9]|[5-9])|reason|think)"
    r"|(?:^|/)gemini-(?:2\.5|[3-9]|(?:flash|pro|flash-lite)-latest)",
    re.IGNORECASE,
)


def may_reason(model: str) -> bool:
    """Whether ``model`` may bill output it does not stream (reasoning): an answer of it cut
    before its usage was reported is bounded by its output limit (:attr:`Turn.unseen_output`).
    A model not named as a reasoner that reasons all the same is estimated from its text; a
    model named as one that does not is bounded on the high side: the budget's side."""
    return _REASONING.search(model) is not None


def sent_timeout(error: ProviderError) -> bool:
    """Whether ``error`` is a time limit that ran out after the request went out and before the
    provider answered (not one connecting, not the provider's own HTTP 504): the provider may
    still answer it, and bill it."""
    return (
        isinstance(error, ProviderTimeout)
        and error.http_status is None
        and error.error_type == "timeout"
    )


def output_ceiling(model: str | None, limit: int) -> int:
    """The most output a call of ``model`` sent the output limit ``limit`` can be billed for:
    the limit, and :data:`REASONING_ALLOWANCE` more for a model whose provider bills reasoning
    past it (named as such: DeepSeek's ``deepseek-reasoner``). The reservation holds as much."""
    if model and _REASONING_PAST_LIMIT.search(model):
        return limit + REASONING_ALLOWANCE
    return limit


def upper_bound_usage(request: ProviderRequest, model: str | None = None) -> Usage:
    """The most a call of ``request`` (to ``model``, else the request's) can be billed for:
    its whole input bound and output ceiling (what a call is recorded as when what the
    provider billed is unknown)."""
    ceiling = output_ceiling(model or request.model, request.output_limit)
    return Usage(input_tokens=input_token_bound(request), output_tokens=ceiling)


def input_token_bound(request: ProviderRequest) -> int:
    """The most input tokens the request can be billed for, for reservations: one per UTF-8
    byte of its text (every tokenizer the providers use, byte-level BPE or SentencePiece with
    byte fallback, makes no token of less than one byte), plus :data:`_MESSAGE_OVERHEAD` per
    message (the chat template's tokens) and :data:`_REPLY_OVERHEAD` (the reply's priming).
    (The estimate it replaced, 1.2 x chars/3, was passed by text of digits or hex, which
    tokenizes at a token per 1 to 1.7 characters.)"""
    text_bytes = request.input_chars() + request.input_extra_bytes()
    messages = len(request.turns()) + bool(request.system)
    return text_bytes + _MESSAGE_OVERHEAD * messages + _REPLY_OVERHEAD


@dataclass(frozen=True, slots=True)
class Completion:
    """The result of one successful call (``complete`` or a finished ``stream``)."""

    provider: str
    model: str
    text: str
    finish_reason: str | None
    usage: Usage
    cost_usd: Decimal
    price: Price
    latency_ms: float
    first_token_ms: float | None = None
    response_id: str | None = None
    chunks: int = 0
    usage_estimated: bool = False
    #: Of the output, the tokens the model spent reasoning, as the provider reported them
    #: (OpenAI's ``reasoning_tokens``, Gemini's ``thoughtsTokenCount``); None when it did not
    #: (Anthropic counts thinking in the output without a count of its own).
    reasoning_tokens: int | None = None

    def to_call_result(self) -> ProviderCallResult:
        """This completion as the provider actor's reply to the router."""
        return ProviderCallResult(
            provider=self.provider,
            model=self.model,
            text=self.text,
            finish_reason=self.finish_reason,
            usage=self.usage,
            cost_usd=self.cost_usd,
            latency_ms=self.latency_ms,
            first_token_ms=self.first_token_ms,
            chunks=self.chunks,
            usage_estimated=True if self.usage_estimated else msgspec.UNSET,
        )


class StreamBroken(ProviderStreamBroken):
    """A stream failed after its first chunk: ``partial_text`` was already forwarded, the first
    chunk ``first_token_ms`` after the call started (None: not measured)."""

    def __init__(
        self, message: str, *, partial_text: str, first_token_ms: float | None = None, **kw: Any
    ) -> None:
        super().__init__(message, **kw)
        self.partial_text = partial_text
        self.first_token_ms = first_token_ms


def content_text(value: Any) -> str:
    """A message's ``content`` as text: a string as it is, nothing as "", a list of content
    parts (OpenAI-compatible servers send ``[{"type": "text", "text": ...}]``) as their texts
    joined. Anything else raises ``ValueError`` (a malformed answer): a dict's Python repr was
    taken as the answer's text, and billed."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):
        texts = []
        for part in value:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif not (isinstance(part, dict) and part.get("type") not in (None, "text")):
                raise ValueError("a `content` part holds no text")
        return "".join(texts)
    raise ValueError(f"`content` is {type(value).__name__}, not text")


@dataclass(slots=True)
class Turn:
    """What one call has produced so far; filled by the provider's parser, frame by frame."""

    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    model: str | None = None
    response_id: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read: int = 0
    cache_write: int = 0
    # Of the output, the reasoning tokens as reported (None: not reported).
    reasoning_tokens: int | None = None
    # The service tier the provider says it served the call at (OpenAI's ``service_tier``).
    service_tier: str | None = None
    #: Of ``cache_write``, written for an hour (Anthropic's ``ephemeral_1h_input_tokens``).
    cache_write_1h: int = 0
    #: Output counted apart from the text's, added when the text's count is estimated (Gemini's
    #: thinking tokens, reported when the candidates' count is left out).
    extra_output: int = 0
    #: The provider may bill output this answer does not show (a reasoning model's reasoning,
    #: a thinking or tool-use block) and has not counted yet: a missing output count is then
    #: bounded by the request's output limit, not estimated from the text (:func:`may_reason`).
    unseen_output: bool = False
    #: Output the provider may bill past the output limit (:func:`output_ceiling`: DeepSeek's
    #: reasoner bills its reasoning past ``max_tokens``), 0 for every other model.
    past_limit: int = 0
    #: The provider answered (HTTP 2xx): it has the request and bills it, whatever comes next.
    answered: bool = False
    #: The provider answered with a status that is no 2xx (an error, a redirect): nothing is
    #: billed, though its body may stall past the time limit.
    refused: bool = False
    #: The request went out (its transport says so: :meth:`mark_sent`, :meth:`trace_sent`):
    #: from then on a time limit may leave a call the provider still answers and bills.
    sent: bool = False
    #: ``output_tokens`` is a running count, not yet the answer's last (Gemini's chunks before
    #: the one that ends it): an answer cut then may have made more.
    running_output: bool = False
    done: bool = False

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def mark_sent(self) -> None:
        """Called by the transport as the request goes out (``SENT_HOOK``)."""
        self.sent = True

    async def trace_sent(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's ``trace`` callback: the request's headers start going out (HTTP/1.1 or
        2), not a proxy's ``CONNECT`` (traced too: it carries the request's extensions)."""
        if event.endswith(".send_request_headers.started"):
            request = info.get("request")
            if getattr(request, "method", None) != b"CONNECT":
                self.sent = True

    def usage(self, request: ProviderRequest) -> tuple[Usage, bool]:
        """The usage (reported; missing counts estimated), and whether anything was estimated.

        A missing count is bounded, never under-counted (the spend it records settles the
        call's hold): the output at one token per UTF-8 byte of the text received (plus the
        thinking tokens counted apart), at most the request's output limit (which the provider
        was sent, and bills nothing past); the whole output limit when the provider may bill
        output it does not show (:attr:`unseen_output`); the input at
        :func:`input_token_bound` of the request.

        An output count reported on the way (:attr:`running_output`, Gemini's) is not the last
        one: the output is the larger of it and the estimate, whether the answer was cut
        (cancelled, timed out) or ended without a last count (before 2026-11-27 the running
        count of an answer that ended so was taken as its last). A count the provider gave as
        the answer's last (OpenAI's usage chunk, Anthropic's ``message_delta``, Gemini's final
        chunk, Ollama's ``done``) stands as it is, however the stream ended after it.
        """
        self._drop_bad_counts()
        clamped = self._clamp_impossible_counts(request)
        running = self.running_output
        estimated = clamped or self.input_tokens is None or self.output_tokens is None or running
        output = self.output_tokens
        if output is None:
            output = self._output_bound(request)
        elif running:
            output = max(output, self._output_bound(request))
        inputs = self.input_tokens
        if inputs is None:
            # The bound covers every input token, cached or not; cache counts reported with no
            # input count stay (priced apart, within the bound) only if they fit in it.
            inputs = input_token_bound(request)
            if self.cache_read + self.cache_write > inputs:
                self.cache_read = self.cache_write = self.cache_write_1h = 0
        usage = Usage(
            input_tokens=inputs,
            output_tokens=output,
            cache_read_tokens=self.cache_read,
            cache_write_tokens=self.cache_write,
            cache_write_1h_tokens=self.cache_write_1h or msgspec.UNSET,
        )
        return usage, estimated

    def _output_bound(self, request: ProviderRequest) -> int:
        most = request.output_limit + self.past_limit
        if self.unseen_output:
            return most
        text = self.text
        # No more than the limit the provider was sent: it bills no output past it.
        return min(len(text) + _extra_bytes(text) + self.extra_output, most)

    def _clamp_impossible_counts(self, request: ProviderRequest) -> bool:
        """A count past what the request could be billed for is not taken as given: output past
        the output limit the provider was sent (it bills none past it, reasoning and thinking
        included; past it and :attr:`past_limit` for a provider that bills reasoning beyond it:
        DeepSeek's reasoner), input past
        :func:`input_token_bound` and a template's allowance (:data:`INPUT_TEMPLATE_ALLOWANCE`).
        It is cut to that most (logged; the usage is then estimated), so one absurd answer can
        neither settle far above its hold nor lock a budget, and a count just past the most is
        still billed at the most. Returns whether a count was cut."""
        cut = False
        output, inputs = self.output_tokens, self.input_tokens
        most = request.output_limit + self.past_limit
        if output is not None and output > most:
            _log.warning(
                "the provider reported %d output tokens for an output limit of %d; billed %d",
                output,
                request.output_limit,
                most,
            )
            self.output_tokens, cut = most, True
        if inputs is not None and inputs > INPUT_TEMPLATE_ALLOWANCE:  # (else within it: cheap)
            bound = input_token_bound(request) + INPUT_TEMPLATE_ALLOWANCE
            if inputs > bound:
                _log.warning(
                    "the provider reported %d input tokens for a request of at most %d; billed %d",
                    inputs,
                    bound,
                    bound,
                )
                self.input_tokens, cut = bound, True
                # The cache counts cut to fit in it too, reads first (zeroed, a count a little
                # past the most billed ten times what one a little within it did).
                self.cache_read = min(self.cache_read, bound)
                self.cache_write = min(self.cache_write, bound - self.cache_read)
                self.cache_write_1h = min(self.cache_write_1h, self.cache_write)
        return cut

    def _drop_bad_counts(self) -> None:
        """A reported count that is negative, past :data:`MAX_TOKEN_COUNT` or not an integer is
        not one: it is dropped (logged) and the count estimated like a missing one, so a
        provider's nonsense neither bills a negative amount nor stores an event no reader can
        decode, and the call's spend is still recorded (on the high side)."""
        inputs, output = self.input_tokens, self.output_tokens
        read, write, hour = self.cache_read, self.cache_write, self.cache_write_1h
        if (
            (inputs is None or (type(inputs) is int and 0 <= inputs <= MAX_TOKEN_COUNT))
            and (output is None or (type(output) is int and 0 <= output <= MAX_TOKEN_COUNT))
            and type(read) is int
            and type(write) is int
            and type(hour) is int
            and 0 <= read <= MAX_TOKEN_COUNT
            and 0 <= hour <= write <= MAX_TOKEN_COUNT
            and (inputs is None or read + write <= inputs)
        ):
            return  # every count a count (the usual case): nothing to drop, nothing to say
        counts = {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read": self.cache_read,
            "cache_write": self.cache_write,
        }
        bad = {name: value for name, value in counts.items() if not _token_count(value)}
        if not _token_count(self.cache_write_1h) or (
            "cache_write" not in bad and self.cache_write_1h > self.cache_write
        ):
            # Which writes were for an hour is not known: all of them are billed as such, the
            # dearer rate (never under-counted).
            _log.warning(
                "the provider reported %s hour-long cache writes of %s; all billed as such",
                str(self.cache_write_1h)[:24],
                str(self.cache_write)[:24],
            )
            self.cache_write_1h = self.cache_write if _token_count(self.cache_write) else 0
        inputs = self.input_tokens
        if not bad and inputs is not None and self.cache_read + self.cache_write > inputs:
            bad = {"input_tokens": inputs, "cache_read": self.cache_read}  # input includes them
        if not bad:
            return
        _log.warning(
            "the provider reported token counts that are not counts (%s); estimated instead",
            ", ".join(f"{name}={str(value)[:24]}" for name, value in bad.items()),
        )
        if "input_tokens" in bad or "cache_read" in bad or "cache_write" in bad:
            # Estimated from the request at the full input price: which of the three is wrong
            # is not known, so none of them is trusted.
            self.input_tokens = None
            self.cache_read = self.cache_write = self.cache_write_1h = 0
        if "output_tokens" in bad:
            self.output_tokens = None
