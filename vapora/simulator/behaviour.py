"""What the simulator does for a request: chosen by the model name and the control endpoint.

Model-name tokens (TensorZero's dummy-provider idea: failure paths need only config). Any number of
them may be embedded in a model name, e.g. ``claude-sonnet-4-5-ttft-50-tps-200-cached-100``:

=====================  ===========================================================================
``slow-<ms>``          wait before answering (before the response head)
``ttft-<ms>``          wait before the first streamed chunk (non-streaming: added to the wait)
``tps-<n>``            stream at n chunks per second (non-streaming: wait words/n seconds)
``len-<n>``            answer with exactly n words (cycling the prompt's words)
``error-<status>``     answer with that HTTP error in the provider's own error shape
``retryms-<ms>``       the wait a 429 asks for (default 1000 ms)
``flaky-<n>``          fail n % of calls to this provider, evenly spread (every 5th call for
                       ``flaky-20``), with the control's ``fail_with`` (default ``error-503``)
``quota``              the provider's quota/billing exhaustion error
``malformed``          a 200 whose JSON (or first stream event) is broken
``cut-<n>``            close the connection after n streamed chunks (non-streaming: mid-body)
``error-after-200``    an error event after HTTP 200, after n chunks if ``cut-<n>`` is given
                       (then the stream is not cut), else after 2 chunks; streams only
``stall-<n>``          stop sending after n streamed chunks but keep the connection open
``hang``               never answer (until the client goes away)
``drop``               close the connection without answering (a reset before the first byte)
``cached-<n>``         n input tokens read from the prompt cache
``cachew-<n>``         n input tokens written to the prompt cache (Anthropic, OpenAI)
``cachew1h-<n>``       n more written for an hour (Anthropic ``ephemeral_1h_input_tokens``;
                       other providers: as ``cachew``)
``thoughts-<n>``       n reasoning tokens (Gemini ``thoughtsTokenCount``, OpenAI
                       ``reasoning_tokens``, included in Anthropic's ``output_tokens`` with a
                       thinking block before the text, summarised as Claude 4 returns it)
``ctx-<n>``            the model's context window is n tokens: a longer input (a token per four
                       characters) is refused with the provider's own context-length error
``nousage``            OpenAI: no usage chunk even when ``include_usage`` was asked
``nocounts``           Ollama: omit ``prompt_eval_count`` and ``eval_count``
=====================  ===========================================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = ["Behaviour", "ProviderControl", "parse_behaviour"]

_TOKEN = re.compile(
    r"(?<![a-z0-9])(?:(error-after-200|quota|malformed|hang|drop|nousage|nocounts)"
    r"|(slow|ttft|tps|len|error|retryms|flaky|cut|stall|cached|cachew1h|cachew|thoughts|ctx)"
    r"-(\d+))"
    r"(?![a-z])"
)
_FLAGS = {
    "error-after-200": "error_after_200",
    "quota": "quota",
    "malformed": "malformed",
    "hang": "hang",
    "drop": "drop",
    "nousage": "no_usage",
    "nocounts": "no_counts",
}
_NUMBERS = {
    "slow": "latency_ms",
    "ttft": "ttft_ms",
    "tps": "tps",
    "len": "length",
    "error": "error_status",
    "retryms": "retry_ms",
    "flaky": "flaky_percent",
    "cut": "cut_after",
    "stall": "stall_after",
    "cached": "cache_read",
    "cachew": "cache_write",
    "cachew1h": "cache_write_1h",
    "thoughts": "thoughts",
    "ctx": "context_window",
}


@dataclass(frozen=True, slots=True)
class Behaviour:
    """One request's behaviour; ``None``/``False`` means "not set" (so layers can be merged)."""

    latency_ms: int | None = None
    ttft_ms: int | None = None
    tps: int | None = None
    length: int | None = None
    error_status: int | None = None
    retry_ms: int | None = None
    flaky_percent: int | None = None
    quota: bool = False
    malformed: bool = False
    cut_after: int | None = None
    error_after_200: bool = False
    stall_after: int | None = None
    hang: bool = False
    drop: bool = False
    cache_read: int | None = None
    cache_write: int | None = None
    cache_write_1h: int | None = None
    thoughts: int | None = None
    context_window: int | None = None
    no_usage: bool = False
    no_counts: bool = False
    #: OpenAI's ``service_tier`` in the answer (``default`` unless set: a project's default
    #: tier may be ``priority`` or ``flex``); set through the controls, not a model name.
    service_tier: str | None = None

    def over(self, base: Behaviour) -> Behaviour:
        """This behaviour with ``base``'s values where this one sets nothing."""
        if base == _NOTHING:
            return self
        changes = {
            f.name: getattr(base, f.name)
            for f in fields(self)
            if _unset(getattr(self, f.name)) and not _unset(getattr(base, f.name))
        }
        return replace(self, **changes) if changes else self

    @property
    def fails(self) -> bool:
        """Whether the answer is an HTTP error instead of a completion."""
        return self.error_status is not None or self.quota

    @property
    def paced(self) -> bool:
        """Whether a stream must be written over time rather than at once."""
        return bool(self.ttft_ms or self.tps or self.stall_after is not None or self.hang)


_NOTHING = Behaviour()
_CACHE: dict[str, Behaviour] = {}


def parse_behaviour(text: str) -> Behaviour:
    """The behaviour encoded in a model name (or a control string); cached per name."""
    cached = _CACHE.get(text)
    if cached is not None:
        return cached
    values: dict[str, Any] = {}
    for match in _TOKEN.finditer(text.lower()):
        flag, word, number = match.groups()
        if flag:
            values[_FLAGS[flag]] = True
        else:
            values[_NUMBERS[word]] = int(number)
    behaviour = Behaviour(**values)
    if len(_CACHE) < 4096:
        _CACHE[text] = behaviour
    return behaviour


@dataclass(slots=True)
class ProviderControl:
    """Control-endpoint state of one provider: default behaviour and injected failures."""

    defaults: Behaviour = _NOTHING
    fail_next: int = 0
    fail_until: float = 0.0
    fail_with: Behaviour = Behaviour(error_status=503)
    flaky_calls: int = 0

    def effective(self, model: str, now: float) -> tuple[Behaviour, bool]:
        """The behaviour for a call to ``model`` at monotonic ``now``, and whether it was forced."""
        if self.fail_next > 0:
            self.fail_next -= 1
            return self.fail_with, True
        if now < self.fail_until:
            return self.fail_with, True
        behaviour = parse_behaviour(model).over(self.defaults)
        if behaviour.flaky_percent and self._flaky_turn(behaviour.flaky_percent):
            return self.fail_with, False
        return behaviour, False

    def _flaky_turn(self, percent: int) -> bool:
        """Whether this call is one of the ``percent`` in 100 that fail (spread evenly)."""
        self.flaky_calls += 1
        return self.flaky_calls * percent // 100 != (self.flaky_calls - 1) * percent // 100

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "defaults": _describe(self.defaults),
            "fail_next": self.fail_next,
            "fail_for_s": max(self.fail_until - now, 0.0),
            "fail_with": _describe(self.fail_with),
        }


def _describe(behaviour: Behaviour) -> dict[str, Any]:
    return {
        f.name: getattr(behaviour, f.name)
        for f in fields(behaviour)
        if not _unset(getattr(behaviour, f.name))
    }


def _unset(value: object) -> bool:
    return value is None or value is False
