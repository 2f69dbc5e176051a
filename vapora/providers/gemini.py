"""Gemini client: ``generateContent`` and ``streamGenerateContent?alt=sse`` (providers.md §3.3).

Authentication is the ``x-goog-api-key`` header (never the ``?key=`` query, which would put the
key in URLs and therefore in logs). The base URL is the bare host, as in DESIGN §5; requests go to
``/v1beta/models/{model}:…`` unless the base URL already names a version (``…/v1``).
Usage: ``promptTokenCount`` (+ ``toolUsePromptTokenCount``) includes ``cachedContentTokenCount``;
output is ``candidatesTokenCount`` + ``thoughtsTokenCount``; a stream's usage is its last chunk's.
"""

from __future__ import annotations

from typing import Any, ClassVar
from urllib.parse import quote

import msgspec

from vapora.errors import ProviderConfigError, ProviderError, ProviderQuotaExhausted
from vapora.providers.base import ProviderClient
from vapora.providers.values import ProviderRequest, Turn, content_text, count_sum
from vapora.providers.wire import Frame, parse_duration

__all__ = ["GeminiClient"]

_FINISH = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "MALFORMED_FUNCTION_CALL": "tool_calls",
}
_ROLES = {"user": "user", "assistant": "model"}
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_KEY_REASONS = frozenset(
    {"API_KEY_INVALID", "API_KEY_SERVICE_BLOCKED", "API_KEY_HTTP_REFERRER_BLOCKED"}
)
_ERROR = b'"error"'


class _Part(msgspec.Struct):
    text: str | None = None
    thought: bool | None = None


class _Content(msgspec.Struct):
    parts: list[_Part] | None = None


class _Candidate(msgspec.Struct):
    content: _Content | None = None
    finishReason: str | None = None  # the wire's names, as in the API


class _UsageMetadata(msgspec.Struct):
    promptTokenCount: int | None = None
    toolUsePromptTokenCount: int | None = None
    candidatesTokenCount: int | None = None
    thoughtsTokenCount: int | None = None
    cachedContentTokenCount: int | None = None
    totalTokenCount: int | None = None


class _PromptFeedback(msgspec.Struct):
    blockReason: str | None = None


class _Response(msgspec.Struct):
    """The fields of a GenerateContentResponse we read; the rest is skipped, unread."""

    candidates: list[_Candidate] | None = None
    promptFeedback: _PromptFeedback | None = None
    usageMetadata: _UsageMetadata | None = None
    modelVersion: str | None = None
    responseId: str | None = None


_RESPONSE = msgspec.json.Decoder(_Response)


class GeminiClient(ProviderClient):
    """Gemini models over the Generative Language API."""

    kind: ClassVar[str] = "gemini"
    default_base_url: ClassVar[str] = "https://generativelanguage.googleapis.com"

    @classmethod
    def _headers(cls, api_key: str | None) -> dict[str, str]:
        return {"x-goog-api-key": api_key} if api_key else {}

    def _path(self, request: ProviderRequest, model: str, *, stream: bool) -> str:
        name = quote(model.removeprefix("models/"), safe="-._~")
        prefix = "" if self.base_url.endswith(("/v1", "/v1beta", "/v1alpha")) else "/v1beta"
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        return f"{prefix}/models/{name}:{method}"

    def _body(self, request: ProviderRequest, model: str, stream: bool) -> dict[str, Any]:
        system, turns = request.system_and_turns()
        contents = [{"role": _ROLES[role], "parts": [{"text": content}]} for role, content in turns]
        config: dict[str, Any] = {"maxOutputTokens": request.output_limit}
        if request.temperature is not None:
            config["temperature"] = request.temperature
        body: dict[str, Any] = {"contents": contents}
        if system is not None:
            body["systemInstruction"] = {"parts": [{"text": system}], "role": "user"}
        body["generationConfig"] = config
        return body

    def _parse(self, data: Any, turn: Turn) -> None:
        if not data.get("candidates") and "promptFeedback" not in data:
            raise ValueError("neither `candidates` nor `promptFeedback`")  # no answer at all
        text = self._apply(data, turn)
        turn.parts = [text] if text else []
        turn.done = True

    def _parse_usage(self, data: Any, turn: Turn) -> None:
        usage = data.get("usageMetadata")
        if isinstance(usage, dict):
            _apply_usage(turn, usage, "")

    def _on_frame(self, frame: Frame, turn: Turn) -> str | None:
        if _ERROR not in frame.data:
            try:
                return _read_response(_RESPONSE.decode(frame.data), turn) or None
            except msgspec.ValidationError:
                pass  # an unexpected shape: read it field by field below
        try:
            chunk = msgspec.json.decode(frame.data)
        except msgspec.DecodeError as exc:
            raise self._malformed() from exc
        if isinstance(chunk, dict) and "error" in chunk:
            error = chunk["error"] if isinstance(chunk["error"], dict) else {}
            code = error.get("code")
            status = code if isinstance(code, int) and 400 <= code < 600 else 500
            raise self._http_error(status, {}, frame.data)
        return self._apply(chunk, turn) or None

    def _apply(self, data: Any, turn: Turn) -> str:
        """Fill ``turn`` from one GenerateContentResponse; return its text."""
        feedback = data.get("promptFeedback")
        if (
            not data.get("candidates")
            and isinstance(feedback, dict)
            and feedback.get("blockReason")
        ):
            _blocked(turn)
        candidates = data.get("candidates") or [{}]
        candidate = candidates[0]
        parts = (candidate.get("content") or {}).get("parts") or []
        text = "".join(content_text(p.get("text")) for p in parts if not p.get("thought"))
        if candidate.get("finishReason"):
            reason = str(candidate["finishReason"])
            turn.finish_reason = _FINISH.get(reason, reason.lower())
            turn.done = True
        turn.model = data.get("modelVersion") or turn.model
        turn.response_id = data.get("responseId") or turn.response_id
        usage = data.get("usageMetadata")
        if isinstance(usage, dict):
            _apply_usage(turn, usage, text, blocked=not data.get("candidates"))
        return text

    def _error_fields(self, payload: Any) -> tuple[str | None, str]:
        error = payload.get("error") if isinstance(payload, dict) else None
        if not isinstance(error, dict):
            return None, ""
        return error.get("status"), str(error.get("message") or "")

    def _error_class(
        self, status: int, error_type: str | None, payload: Any
    ) -> type[ProviderError] | None:
        if error_type == "FAILED_PRECONDITION":
            return ProviderQuotaExhausted
        reasons = {d.get("reason") for d in _details(payload)}
        if status == 400 and reasons & _KEY_REASONS:
            return ProviderConfigError
        if error_type == "UNAUTHENTICATED":
            return ProviderConfigError
        return None

    def _retry_hint(self, payload: Any) -> float | None:
        for detail in _details(payload):
            if detail.get("@type") == _RETRY_INFO and isinstance(detail.get("retryDelay"), str):
                return parse_duration(detail["retryDelay"])
        return None


def _read_response(data: _Response, turn: Turn) -> str:
    """A response of the usual shape applied to ``turn`` (as :meth:`GeminiClient._apply`)."""
    candidate = data.candidates[0] if data.candidates else None
    text = ""
    if candidate is None and data.promptFeedback is not None and data.promptFeedback.blockReason:
        _blocked(turn)
    if candidate is not None:
        parts = candidate.content.parts if candidate.content is not None else None
        if parts:
            text = "".join(p.text or "" for p in parts if not p.thought)
        if candidate.finishReason:
            turn.finish_reason = _FINISH.get(candidate.finishReason, candidate.finishReason.lower())
            turn.done = True
    turn.model = data.modelVersion or turn.model
    turn.response_id = data.responseId or turn.response_id
    usage = data.usageMetadata
    if usage is not None:
        turn.input_tokens = count_sum(usage.promptTokenCount, usage.toolUsePromptTokenCount)
        blocked = candidate is None and data.promptFeedback is not None
        _output(
            turn,
            usage.candidatesTokenCount,
            usage.thoughtsTokenCount,
            text,
            usage.totalTokenCount,
            blocked,
        )
        turn.cache_read = (
            (usage.cachedContentTokenCount or 0) if turn.input_tokens is not None else 0
        )
    return text


def _details(payload: Any) -> list[dict[str, Any]]:
    error = payload.get("error") if isinstance(payload, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def _blocked(turn: Turn) -> None:
    """The prompt was blocked (``promptFeedback.blockReason``, no candidate): the answer ends
    here, empty, as a content filter's finish, streamed or not (the input is billed as
    reported)."""
    turn.finish_reason = "content_filter"
    turn.done = True


def _output(
    turn: Turn,
    candidates: Any,
    thoughts: Any,
    text: str,
    total: Any = None,
    blocked: bool = False,
) -> None:
    """Output = the candidates' tokens plus the thinking tokens; with the candidates' count left
    out, the text's count is estimated and the thinking tokens are added to it. The thinking
    is over once text comes: with its count reported by then, the answer holds no output it
    does not show, and a stream cut after it is estimated from its text and that count, not
    bounded by the output limit (:attr:`Turn.unseen_output`). Without it (a model that did
    not think says nothing, and a stream may give the count only at its end) a model that
    may think stays bounded.

    Gemini leaves a count of zero out of its JSON (proto3): the final answer of a prompt it
    blocked, or one that ended before any text (a safety stop, the limit reached while
    thinking), has no ``candidatesTokenCount``. Once such an answer is done with no text at
    all, that count is what ``totalTokenCount`` leaves past the input and the thinking, and 0
    for a prompt it blocked (no candidate) that states no total (before 2026-11-27 it was
    unknown, and a model that may think was billed its whole output limit: $0.04 instead of
    $0.0001 for a blocked prompt to Gemini 2.5 Pro). An answer with text and no count, or no
    total to read one from, stays bounded: the count is not known."""
    if candidates is None and turn.done and not (text or turn.parts):
        candidates = _final_candidates(turn, thoughts, total, blocked)
    if thoughts is not None and (text or turn.parts):
        turn.unseen_output = False
    turn.reasoning_tokens = count_sum(thoughts) if thoughts is not None else None
    turn.running_output = not turn.done  # every chunk's counts so far; the last one's final
    if candidates is None:
        turn.output_tokens = None
        turn.extra_output = count_sum(thoughts) or 0
    else:
        turn.output_tokens = count_sum(candidates, thoughts)


def _final_candidates(turn: Turn, thoughts: Any, total: Any, blocked: bool) -> int | None:
    """The candidates' count a finished answer with no text left out (see :func:`_output`),
    or None: not known."""
    inputs, spent = turn.input_tokens, count_sum(total)
    thought = count_sum(thoughts) if thoughts is not None else 0
    if spent is not None and inputs is not None and thought is not None:
        rest = spent - inputs - thought
        return rest if rest >= 0 else None  # a total that does not add up: not known
    return 0 if blocked and total is None else None


def _apply_usage(turn: Turn, usage: dict[str, Any], text: str, blocked: bool = False) -> None:
    """Gemini usage in our semantics: input includes cached and tool-use prompt tokens."""
    turn.input_tokens = count_sum(
        usage.get("promptTokenCount"), usage.get("toolUsePromptTokenCount")
    )
    _output(
        turn,
        usage.get("candidatesTokenCount"),
        usage.get("thoughtsTokenCount"),
        text,
        usage.get("totalTokenCount"),
        blocked,
    )
    cached = usage.get("cachedContentTokenCount") or 0  # checked with the rest (Turn.usage)
    turn.cache_read = cached if turn.input_tokens is not None else 0
