"""OpenAI Chat Completions (``POST /v1/chat/completions``) as the simulator speaks it.

Usage semantics: ``prompt_tokens`` includes ``prompt_tokens_details.cached_tokens``;
``completion_tokens`` includes ``reasoning_tokens``. A stream carries usage only in an extra
chunk with empty ``choices`` before ``[DONE]``, and only if ``stream_options.include_usage``.
"""

from __future__ import annotations

import time
from typing import Any

from vapora.simulator.behaviour import Behaviour
from vapora.simulator.dialects.base import (
    BadRequest,
    Dialect,
    ErrorAnswer,
    StreamPlan,
    ceil_seconds,
    encode,
    retry_seconds,
    sse,
    text_of,
)
from vapora.simulator.http import Request
from vapora.simulator.reply import Reply, Turn

__all__ = ["OpenAIDialect"]

_ERRORS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}
_DONE = b"data: [DONE]\n\n"
_TIERS = ("auto", "default", "flex", "priority", "scale")
_FINGERPRINT = "fp_sim0000001"


class OpenAIDialect(Dialect):
    name = "openai"

    def authorized(self, request: Request) -> bool:
        return request.headers.get("authorization", "").startswith("Bearer ")

    def turn(self, body: Any, request: Request) -> Turn:
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise BadRequest("you must provide a model parameter")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' is a required property")
        texts = [text_of(m.get("content")) for m in messages if isinstance(m, dict)]
        users = [text_of(m.get("content")) for m in messages if m.get("role") == "user"]
        options = body.get("stream_options") or {}
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        tier = body.get("service_tier")
        if tier is not None and tier not in _TIERS:
            raise BadRequest(
                f"Invalid value for 'service_tier': {tier!r}; expected one of {', '.join(_TIERS)}"
            )
        return Turn(
            model=body["model"],
            stream=bool(body.get("stream")),
            input_chars=sum(map(len, texts)),
            last_user=users[-1] if users else "",
            max_tokens=limit if isinstance(limit, int) else None,
            include_usage=bool(options.get("include_usage")),
            service_tier=tier,
        )

    def completion(self, reply: Reply, turn: Turn, behaviour: Behaviour) -> bytes:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": reply.text,
            "refusal": None,
            "annotations": [],
        }
        return encode(
            {
                "id": reply.id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": reply.model,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": _finish(reply),
                    }
                ],
                "usage": _usage(reply),
                "service_tier": _served(turn, behaviour),
                "system_fingerprint": _FINGERPRINT,
            }
        )

    def stream(self, reply: Reply, turn: Turn, behaviour: Behaviour) -> StreamPlan:
        created = int(time.time())
        with_usage = turn.include_usage
        first = {"role": "assistant", "content": "", "refusal": None}
        tier = _served(turn, behaviour)
        head = [sse(_chunk(reply, created, first, None, with_usage, tier))]
        chunks = [
            sse(_chunk(reply, created, {"content": text}, None, with_usage, tier))
            for text in reply.chunks
        ]
        tail = [sse(_chunk(reply, created, {}, _finish(reply), with_usage, tier))]
        if with_usage and not behaviour.no_usage:
            usage_chunk = _chunk(reply, created, None, None, with_usage, tier)
            usage_chunk["usage"] = _usage(reply)
            tail.append(sse(usage_chunk))
        tail.append(_DONE)
        return StreamPlan(head, chunks, tail)

    def stream_error(self) -> bytes:
        error = {
            "message": "The server had an error while processing your request.",
            "type": "server_error",
            "param": None,
            "code": None,
        }
        return sse({"error": error})

    def error(self, status: int, behaviour: Behaviour, message: str | None = None) -> ErrorAnswer:
        headers = [("content-type", "application/json"), ("x-request-id", "req_sim_error")]
        code: str | None
        if status == 0:
            status, kind, code = 429, "insufficient_quota", "insufficient_quota"
            message = "You exceeded your current quota, please check your plan and billing details."
        else:
            kind, code = _ERRORS.get(
                status, ("server_error" if status >= 500 else "invalid_request_error", None)
            )
            message = message or f"simulated {kind}"
            if status == 429:
                message = "Rate limit reached for requests: simulated"
                headers += _rate_limit_headers(behaviour)
        error: dict[str, Any] = {"message": message, "type": kind, "param": None, "code": code}
        return status, headers, encode({"error": error})

    def overflow(self, tokens: int, window: int) -> ErrorAnswer:
        message = (
            f"This model's maximum context length is {window} tokens. However, your messages "
            f"resulted in {tokens} tokens. Please reduce the length of the messages."
        )
        error = {
            "message": message,
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
        headers = [("content-type", "application/json"), ("x-request-id", "req_sim_error")]
        return 400, headers, encode({"error": error})


def _finish(reply: Reply) -> str:
    return "length" if reply.truncated else "stop"


def _usage(reply: Reply) -> dict[str, Any]:
    prompt = reply.prompt_tokens + reply.cache_read + reply.cache_write
    completion = reply.words + reply.thoughts
    prompt_details: dict[str, int] = {"cached_tokens": reply.cache_read, "audio_tokens": 0}
    if reply.cache_write:
        prompt_details["cache_write_tokens"] = reply.cache_write
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": prompt_details,
        "completion_tokens_details": {
            "reasoning_tokens": reply.thoughts,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _chunk(
    reply: Reply,
    created: int,
    delta: dict[str, Any] | None,
    finish: str | None,
    usage: bool,
    tier: str = "default",
) -> dict[str, Any]:
    choices = (
        []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    )
    chunk: dict[str, Any] = {
        "id": reply.id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": reply.model,
        "service_tier": tier,
        "system_fingerprint": _FINGERPRINT,
        "choices": choices,
    }
    if usage:
        chunk["usage"] = None
    return chunk


def _rate_limit_headers(behaviour: Behaviour) -> list[tuple[str, str]]:
    wait_ms = int(retry_seconds(behaviour) * 1000)
    return [
        ("retry-after", str(ceil_seconds(behaviour))),
        ("retry-after-ms", str(wait_ms)),
        ("x-ratelimit-limit-requests", "500"),
        ("x-ratelimit-remaining-requests", "0"),
        ("x-ratelimit-reset-requests", f"{wait_ms}ms"),
    ]


def _served(turn: Turn, behaviour: Behaviour) -> str:
    """The tier a call is served at: the one it asked for; with none (or ``auto``), the
    project's default (the behaviour's ``service_tier``, else ``default``), as OpenAI does."""
    if turn.service_tier is not None and turn.service_tier != "auto":
        return turn.service_tier
    return behaviour.service_tier or "default"
