"""OpenAI Chat Completions client (``POST {base}/chat/completions``; providers.md §3.2).

Usage: ``prompt_tokens`` already includes ``prompt_tokens_details.cached_tokens``, so it is our
input as is. Streams ask for ``stream_options.include_usage``; the usage arrives in a last chunk
with empty ``choices``, and a stream that ends without it has its usage estimated (flagged). An
``error`` object in the stream after HTTP 200 is classified like an HTTP error.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec

from vapora.errors import ProviderError, ProviderQuotaExhausted
from vapora.providers.base import ProviderClient
from vapora.providers.values import ProviderRequest, Turn, content_text, count_sum
from vapora.providers.wire import Frame

__all__ = ["OpenAIClient"]

_QUOTA_CODES = frozenset(
    {
        "insufficient_quota",
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "organization_usage_limit_exceeded",
        "billing_hard_limit_reached",
    }
)
_DONE = b"[DONE]"
_ERROR = b'"error"'


class _Delta(msgspec.Struct):
    content: str | None = None
    # Reasoning text some OpenAI-compatible servers stream (vLLM, DeepSeek, OpenRouter): output
    # billed that the answer's text does not show.
    reasoning_content: str | None = None
    reasoning: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _PromptDetails | None = None
    completion_tokens_details: Any = None  # read as it comes: only its reasoning count is used


class _Chunk(msgspec.Struct):
    """The fields of a stream chunk we read; the rest is skipped by the decoder, unread."""

    id: str | None = None
    model: str | None = None
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    service_tier: str | None = None


_CHUNK = msgspec.json.Decoder(_Chunk)


class OpenAIClient(ProviderClient):
    """GPT models over Chat Completions (base URL includes ``/v1``, as in the SDK)."""

    kind: ClassVar[str] = "openai"
    default_base_url: ClassVar[str] = "https://api.openai.com/v1"

    def __init__(self, *, service_tier: str | None = None, **options: Any) -> None:
        """``service_tier``: sent with every call (``[[providers]] service_tier``); None sends
        none, and the project's default tier serves the call."""
        super().__init__(**options)
        self.service_tier = service_tier

    @classmethod
    def _headers(cls, api_key: str | None) -> dict[str, str]:
        headers = {"accept": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        return headers

    def _path(self, request: ProviderRequest, model: str, *, stream: bool) -> str:
        return "/chat/completions"

    def _body(self, request: ProviderRequest, model: str, stream: bool) -> dict[str, Any]:
        messages = [{"role": "system", "content": request.system}] if request.system else []
        messages += [{"role": role, "content": content} for role, content in request.turns()]
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "max_completion_tokens": request.output_limit,
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if self.service_tier is not None:
            body["service_tier"] = self.service_tier
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def _parse(self, data: Any, turn: Turn) -> None:
        choices = data["choices"]
        if not isinstance(choices, list) or not choices:
            raise ValueError("no `choices`")
        message = choices[0].get("message") or {}
        turn.parts = [content_text(message.get("content"))]
        turn.finish_reason = choices[0].get("finish_reason")
        turn.model = data.get("model")
        turn.response_id = data.get("id")
        turn.service_tier = _tier(data.get("service_tier"))
        _apply_usage(turn, data.get("usage"))
        turn.done = True

    def _parse_usage(self, data: Any, turn: Turn) -> None:
        _apply_usage(turn, data.get("usage"))

    def _on_frame(self, frame: Frame, turn: Turn) -> str | None:
        data = frame.data
        if data == _DONE:
            turn.done = True
            return None
        if _ERROR not in data and not frame.event:
            try:
                return _read_chunk(_CHUNK.decode(data), turn)
            except msgspec.ValidationError:
                pass  # an unexpected shape: read it field by field below
        return self._on_frame_dict(frame, turn)

    def _on_frame_dict(self, frame: Frame, turn: Turn) -> str | None:
        """Any chunk, decoded to a dict: errors, and shapes the typed decoder does not take."""
        try:
            chunk = msgspec.json.decode(frame.data)
        except msgspec.DecodeError as exc:
            raise self._malformed() from exc
        if "error" in chunk or frame.event == "error":
            raise self._http_error(_stream_status(chunk), {}, frame.data)
        turn.model = chunk.get("model") or turn.model
        turn.response_id = chunk.get("id") or turn.response_id
        turn.service_tier = _tier(chunk.get("service_tier")) or turn.service_tier
        choices = chunk.get("choices") or []
        if choices and choices[0].get("finish_reason"):
            turn.finish_reason = choices[0]["finish_reason"]
        if isinstance(chunk.get("usage"), dict):
            _apply_usage(turn, chunk["usage"])
            _running(turn)
        if not choices:
            return None
        delta = choices[0].get("delta") or {}
        if isinstance(delta, dict) and (delta.get("reasoning_content") or delta.get("reasoning")):
            turn.unseen_output = True
        content = delta.get("content") if isinstance(delta, dict) else None
        return content_text(content) or None

    def _error_fields(self, payload: Any) -> tuple[str | None, str]:
        error = payload.get("error") if isinstance(payload, dict) else None
        if not isinstance(error, dict):
            return None, ""
        kind = error.get("code") or error.get("type")
        return (str(kind) if kind else None), str(error.get("message") or "")

    def _error_status(self, payload: dict[str, Any]) -> int:
        return _stream_status(payload)

    def _error_class(
        self, status: int, error_type: str | None, payload: Any
    ) -> type[ProviderError] | None:
        error = payload.get("error") if isinstance(payload, dict) else None
        if not isinstance(error, dict):
            return None
        # Strings only: a code that was an object raised out of here (unhashable), and the
        # refusal was billed as an internal error at its upper bound (a review).
        if any(
            isinstance(v, str) and v in _QUOTA_CODES for v in (error.get("code"), error.get("type"))
        ):
            return ProviderQuotaExhausted
        return None

    def _context_overflow(self, error_type: str | None, payload: Any, message: str) -> bool:
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict) and error.get("code") == "context_length_exceeded":
            return True
        return super()._context_overflow(error_type, payload, message)


def _read_chunk(chunk: _Chunk, turn: Turn) -> str | None:
    """A chunk of the usual shape applied to ``turn``; its text."""
    turn.model = chunk.model or turn.model
    turn.response_id = chunk.id or turn.response_id
    turn.service_tier = _tier(chunk.service_tier) or turn.service_tier
    choice = chunk.choices[0] if chunk.choices else None
    if choice is not None and choice.finish_reason:
        turn.finish_reason = choice.finish_reason
    usage = chunk.usage
    if usage is not None:
        details = usage.prompt_tokens_details
        turn.input_tokens = count_sum(usage.prompt_tokens)
        turn.output_tokens = count_sum(usage.completion_tokens)
        turn.cache_read = (details.cached_tokens or 0) if details else 0
        turn.cache_write = (details.cache_write_tokens or 0) if details else 0
        turn.reasoning_tokens = _reasoning(usage.completion_tokens_details)
        _running(turn)
    if choice is None:
        return None
    delta = choice.delta
    if delta is None:
        return None
    if delta.reasoning_content or delta.reasoning:
        turn.unseen_output = True
    return delta.content or None


# An in-stream error's ``type`` or ``code`` and the HTTP status it stands for, so that it is
# classified as the same error answered before the stream would be (a caller error does not
# fall back, a rate limit closes the provider for a while).
_STATUS_OF_ERROR = {
    "invalid_request_error": 400,
    "context_length_exceeded": 400,
    "invalid_api_key": 401,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "model_not_found": 404,
    "rate_limit_exceeded": 429,
    "rate_limit_error": 429,
    "insufficient_quota": 429,
    "server_error": 500,
    "service_unavailable": 503,
}


def _stream_status(chunk: dict[str, Any]) -> int:
    """The HTTP status an in-stream error stands for (OpenAI sends none: from its numeric
    ``code``, else its ``code`` or ``type`` name, else 500)."""
    error = chunk.get("error") or {}
    if not isinstance(error, dict):
        return 500
    code = error.get("code")
    if isinstance(code, int) and 400 <= code < 600:
        return code
    for name in (code, error.get("type")):
        if isinstance(name, str) and name in _STATUS_OF_ERROR:
            return _STATUS_OF_ERROR[name]
    return 500


def _running(turn: Turn) -> None:
    """A stream's counts before its finish are running ones (an OpenAI-compatible server that
    sends usage in every chunk, vLLM's ``continuous_usage_stats``): cut then, the answer may
    have made more. OpenAI's own usage chunk comes after the finish: the last count."""
    turn.running_output = turn.finish_reason is None


def _apply_usage(turn: Turn, usage: Any) -> None:
    if not isinstance(usage, dict):
        return
    details = usage.get("prompt_tokens_details") or {}
    turn.input_tokens = count_sum(usage.get("prompt_tokens"))
    turn.output_tokens = count_sum(usage.get("completion_tokens"))
    # As reported: a count that is not one is the usage's check to catch (Turn.usage).
    turn.cache_read = details.get("cached_tokens") or 0
    turn.cache_write = details.get("cache_write_tokens") or 0
    turn.reasoning_tokens = _reasoning(usage.get("completion_tokens_details"))


def _tier(value: Any) -> str | None:
    """The response's ``service_tier`` (``default``, ``flex``, ``priority``, ``scale``), or None:
    a short identifier only (it goes to the logs)."""
    if isinstance(value, str) and 0 < len(value) <= 32 and value.replace("_", "").isalnum():
        return value.lower()
    return None


def _reasoning(details: Any) -> int | None:
    """``completion_tokens_details.reasoning_tokens`` (of the output: o-series, GPT-5), or None."""
    count = details.get("reasoning_tokens") if isinstance(details, dict) else None
    return count_sum(count) if count is not None else None
