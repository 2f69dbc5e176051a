"""Anthropic Messages API client (``POST /v1/messages``; providers.md §3.1).

Usage: Anthropic's ``input_tokens`` excludes the cache, so ours is ``input_tokens +
cache_read_input_tokens + cache_creation_input_tokens``. Streams: ``message_start`` carries the
input usage, ``message_delta`` the cumulative usage and the stop reason; ``ping`` is ignored and an
``error`` event after HTTP 200 is classified like an HTTP error of its type.

Headers follow the official SDK (anthropic 2.x, the referee in our tests): the key as
``Authorization: Bearer`` and ``anthropic-version: 2026-10-21`` (providers.md, written from an
older SDK, shows ``x-api-key`` and ``2023-06-01``; the simulator accepts both). The SDK no longer
has sampling parameters, so ``temperature`` is not sent to Anthropic.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec

from vapora.errors import ProviderError, ProviderQuotaExhausted
from vapora.providers.base import ProviderClient
from vapora.providers.values import ProviderRequest, Turn, content_text, count_sum
from vapora.providers.wire import Frame

__all__ = ["AnthropicClient"]

#: The version the official SDK (anthropic 2.x) sends; the SDK also sends the key as a Bearer token.
API_VERSION = "2026-10-21"
_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_STATUS_OF_TYPE = {
    "overloaded_error": 529,
    "api_error": 500,
    "rate_limit_error": 429,
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "billing_error": 402,
    "timeout_error": 504,
}
_QUOTA_PHRASES = ("credit balance", "usage limits", "spend limit")
#: Events that carry nothing we need (their ``event:`` name matches their ``type``).
_SKIPPED = frozenset({"ping", "content_block_stop"})


class _TextDelta(msgspec.Struct):
    type: str | None = None
    text: str | None = None


class _BlockDelta(msgspec.Struct):
    """The fields of a ``content_block_delta`` event we read (most of a stream's events)."""

    type: str | None = None
    delta: _TextDelta | None = None


_BLOCK_DELTA = msgspec.json.Decoder(_BlockDelta)


class AnthropicClient(ProviderClient):
    """Claude over the Messages API."""

    kind: ClassVar[str] = "anthropic"
    default_base_url: ClassVar[str] = "https://api.anthropic.com"

    @classmethod
    def _headers(cls, api_key: str | None) -> dict[str, str]:
        headers = {"anthropic-version": API_VERSION, "accept": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        return headers

    def _path(self, request: ProviderRequest, model: str, *, stream: bool) -> str:
        return "/v1/messages"

    def _body(self, request: ProviderRequest, model: str, stream: bool) -> dict[str, Any]:
        system, turns = request.system_and_turns()
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": request.output_limit,
            "messages": [{"role": role, "content": content} for role, content in turns],
        }
        if system is not None:
            body["system"] = system
        if stream:
            body["stream"] = True
        return body

    def _parse(self, data: Any, turn: Turn) -> None:
        content = data["content"]  # a message has one, possibly empty; no answer has none
        if not isinstance(content, list):
            raise TypeError("`content` is not a list")
        turn.parts = [content_text(b.get("text")) for b in content if b.get("type") == "text"]
        if len(turn.parts) < len(content):  # thinking or a tool call: output the text omits
            turn.unseen_output = True
        turn.model = data.get("model")
        turn.response_id = data.get("id")
        turn.finish_reason = _finish(data.get("stop_reason"))
        _apply_usage(turn, data.get("usage") or {})
        turn.done = True

    def _parse_usage(self, data: Any, turn: Turn) -> None:
        usage = data.get("usage")
        if isinstance(usage, dict):
            _apply_usage(turn, usage)

    def _on_frame(self, frame: Frame, turn: Turn) -> str | None:
        if frame.event in _SKIPPED:
            return None
        if frame.event == "content_block_delta":
            try:
                event = _BLOCK_DELTA.decode(frame.data)
            except msgspec.ValidationError:
                pass  # an unexpected shape: read it field by field below
            else:
                text_delta = event.delta
                if event.type == "content_block_delta" and text_delta is not None:
                    return (text_delta.text or "") if text_delta.type == "text_delta" else None
        try:
            event = msgspec.json.decode(frame.data)
        except msgspec.DecodeError as exc:
            raise self._malformed() from exc
        kind = event.get("type")
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            return str(delta.get("text") or "") if delta.get("type") == "text_delta" else None
        if kind == "content_block_start":
            block = event.get("content_block")
            if not isinstance(block, dict) or block.get("type") != "text":
                # Thinking (summarised when streamed), a redacted thought, a tool call: billed
                # as output the text does not show (vapora asks for none of them).
                turn.unseen_output = True
        elif kind == "message_start":
            message = event.get("message") or {}
            turn.model = message.get("model")
            turn.response_id = message.get("id")
            # Its output count is a placeholder, not cumulative: only message_delta's counts.
            _apply_usage(turn, {**(message.get("usage") or {}), "output_tokens": None})
        elif kind == "message_delta":
            turn.finish_reason = _finish((event.get("delta") or {}).get("stop_reason"))
            _apply_usage(turn, event.get("usage") or {})
        elif kind == "message_stop":
            turn.done = True
        elif kind == "error":
            raise self._stream_error(event)
        return None

    def _stream_error(self, event: dict[str, Any]) -> ProviderError:
        """An ``error`` event after HTTP 200, classified as the HTTP status of its type."""
        return self._http_error(self._error_status(event), {}, msgspec.json.encode(event))

    def _error_status(self, payload: dict[str, Any]) -> int:
        error_type, _ = self._error_fields(payload)
        return _STATUS_OF_TYPE.get(error_type or "", 500)

    def _error_fields(self, payload: Any) -> tuple[str | None, str]:
        error = payload.get("error") if isinstance(payload, dict) else None
        if not isinstance(error, dict):
            return None, ""
        return error.get("type"), str(error.get("message") or "")

    def _error_class(
        self, status: int, error_type: str | None, payload: Any
    ) -> type[ProviderError] | None:
        error = payload.get("error") if isinstance(payload, dict) else None
        details = error.get("details") if isinstance(error, dict) else None
        if (
            isinstance(details, dict)
            and details.get("error_code") == "enforced_spend_limit_reached"
        ):
            return ProviderQuotaExhausted
        if error_type == "billing_error":
            return ProviderQuotaExhausted
        message = str(error.get("message") or "").lower() if isinstance(error, dict) else ""
        if status == 400 and any(phrase in message for phrase in _QUOTA_PHRASES):
            return ProviderQuotaExhausted
        return None


def _finish(reason: Any) -> str | None:
    if reason is None:
        return None
    return _FINISH.get(str(reason), str(reason))


_INPUT, _READ, _WRITE = "input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"


def _apply_usage(turn: Turn, usage: dict[str, Any]) -> None:
    """Anthropic usage (cache excluded from input) in our semantics (cache included).

    As the official SDK accumulates a stream's usage: each count an event gives (not None)
    replaces the one before, and a count it omits or nulls keeps what earlier events said (a
    ``message_delta`` may carry ``input_tokens`` alone, or nulls, after ``message_start``
    reported the cache counts)."""
    if usage.get("output_tokens") is not None:
        turn.output_tokens = count_sum(usage["output_tokens"])
    # The cache writes by how long they last: ``cache_creation_input_tokens`` is their sum.
    breakdown = usage.get("cache_creation")
    if isinstance(breakdown, dict) and breakdown.get("ephemeral_1h_input_tokens") is not None:
        turn.cache_write_1h = breakdown["ephemeral_1h_input_tokens"]  # checked with the rest
    given = {key: usage[key] for key in (_INPUT, _READ, _WRITE) if usage.get(key) is not None}
    if not given:
        return
    counts: dict[str, Any] = {}
    if turn.input_tokens is not None:  # what earlier events said, in Anthropic's terms
        uncached = turn.input_tokens - turn.cache_read - turn.cache_write
        counts = {_INPUT: uncached, _READ: turn.cache_read, _WRITE: turn.cache_write}
    counts.update(given)
    if _INPUT not in counts:
        return  # cache counts without the input's: the input is estimated
    read, write = counts.get(_READ), counts.get(_WRITE)
    # None when a part is not a count: the input is then estimated, and the cache counts, whose
    # share of it is not known, are not trusted either.
    turn.input_tokens = count_sum(counts[_INPUT], read, write)
    known = turn.input_tokens is not None
    turn.cache_read = int(read or 0) if known else 0
    turn.cache_write = int(write or 0) if known else 0
