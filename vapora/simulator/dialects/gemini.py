"""Gemini ``generateContent`` / ``streamGenerateContent?alt=sse`` as the simulator speaks it.

Served under both ``/v1beta/models/…`` (the REST documentation) and ``/v1/models/…`` (the
google-genai SDK's default). Usage semantics: ``promptTokenCount`` includes
``cachedContentTokenCount``; output is ``candidatesTokenCount`` plus ``thoughtsTokenCount``.
A bad API key is a 400 ``INVALID_ARGUMENT`` with reason ``API_KEY_INVALID``, as Google answers
it, so ``error-401`` produces that; quota/billing (``quota``) is 400 ``FAILED_PRECONDITION``.
"""

from __future__ import annotations

from typing import Any

from vapora.simulator.behaviour import Behaviour
from vapora.simulator.dialects.base import (
    BadRequest,
    Dialect,
    ErrorAnswer,
    StreamPlan,
    encode,
    retry_seconds,
    sse,
    text_of,
)
from vapora.simulator.http import Request
from vapora.simulator.reply import Reply, Turn

__all__ = ["GeminiDialect", "gemini_route"]

_STATUS = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"


def gemini_route(path: str) -> tuple[str, str] | None:
    """``(model, method)`` of a Gemini path under ``/v1beta/models/`` or ``/v1/models/``."""
    for prefix in ("/v1beta/models/", "/v1/models/"):
        if path.startswith(prefix):
            model, sep, method = path[len(prefix) :].rpartition(":")
            if sep and method in ("generateContent", "streamGenerateContent"):
                return model, method
    return None


class GeminiDialect(Dialect):
    name = "gemini"
    stream_content_type = "text/event-stream"

    def authorized(self, request: Request) -> bool:
        return bool(request.headers.get("x-goog-api-key")) or "key=" in request.query

    def turn(self, body: Any, request: Request) -> Turn:
        route = gemini_route(request.path)
        contents = body.get("contents") if isinstance(body, dict) else None
        if route is None or not isinstance(contents, list) or not contents:
            raise BadRequest("* GenerateContentRequest.contents: contents is not specified")
        texts = [text_of(c.get("parts")) for c in contents if isinstance(c, dict)]
        users = [text_of(c.get("parts")) for c in contents if c.get("role", "user") == "user"]
        system = body.get("systemInstruction") or body.get("system_instruction") or {}
        config = body.get("generationConfig") or {}
        limit = config.get("maxOutputTokens")
        return Turn(
            model=route[0],
            stream=route[1] == "streamGenerateContent",
            input_chars=len(text_of(system.get("parts"))) + sum(map(len, texts)),
            last_user=users[-1] if users else "",
            max_tokens=limit if isinstance(limit, int) else None,
        )

    def completion(self, reply: Reply, turn: Turn, behaviour: Behaviour) -> bytes:
        return encode(_response(reply, reply.text, _finish(reply), _usage(reply, final=True)))

    def stream(self, reply: Reply, turn: Turn, behaviour: Behaviour) -> StreamPlan:
        chunks = [
            sse(_response(reply, text, None, _usage(reply, final=False, words=i + 1)))
            for i, text in enumerate(reply.chunks)
        ]
        tail = [sse(_response(reply, "", _finish(reply), _usage(reply, final=True)))]
        return StreamPlan([], chunks, tail)

    def stream_error(self) -> bytes:
        return sse(
            {"error": {"code": 500, "message": "Internal error encountered.", "status": "INTERNAL"}}
        )

    def error(self, status: int, behaviour: Behaviour, message: str | None = None) -> ErrorAnswer:
        headers = [("content-type", "application/json; charset=UTF-8")]
        details: list[dict[str, Any]] = []
        if status == 0:
            status, state = 400, "FAILED_PRECONDITION"
            message = (
                "User location is not supported for the API use without a billing account linked."
            )
        elif status == 401:
            status, state = 400, "INVALID_ARGUMENT"
            message = message or "API key not valid. Please pass a valid API key."
            details.append(
                {"@type": _ERROR_INFO, "reason": "API_KEY_INVALID", "domain": "googleapis.com"}
            )
        else:
            state = _STATUS.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT")
            message = message or f"simulated {state}"
        if status == 429:
            delay = f"{retry_seconds(behaviour):g}s"
            details.append(
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}
            )
        error = {"code": status, "message": message, "status": state, "details": details}
        return status, headers, encode({"error": error})

    def overflow(self, tokens: int, window: int) -> ErrorAnswer:
        message = (
            f"The input token count ({tokens}) exceeds the maximum number of tokens allowed "
            f"({window})."
        )
        return self.error(400, Behaviour(), message)


def _finish(reply: Reply) -> str:
    return "MAX_TOKENS" if reply.truncated else "STOP"


def _response(reply: Reply, text: str, finish: str | None, usage: dict[str, Any]) -> dict[str, Any]:
    candidate: dict[str, Any] = {
        "content": {"parts": [{"text": text}], "role": "model"},
        "index": 0,
    }
    if finish is not None:
        candidate["finishReason"] = finish
    return {
        "candidates": [candidate],
        "usageMetadata": usage,
        "modelVersion": reply.model,
        "responseId": reply.id,
    }


def _usage(reply: Reply, *, final: bool, words: int | None = None) -> dict[str, Any]:
    prompt = reply.prompt_tokens + reply.cache_read
    candidates = reply.words if words is None else words
    thoughts = reply.thoughts if final else 0
    # As the API writes it (proto3 JSON): a count of zero is left out.
    usage: dict[str, Any] = {
        "promptTokenCount": prompt,
        "totalTokenCount": prompt + candidates + thoughts,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
    }
    if candidates:
        usage["candidatesTokenCount"] = candidates
    if reply.cache_read:
        usage["cachedContentTokenCount"] = reply.cache_read
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    return usage
